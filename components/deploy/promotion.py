"""The promotion gate: whether a new registered version replaces ``champion``.

Every new version gets the alias ``challenger``. It becomes ``champion`` when, on the same held-out
images (this run's test split, else its validation split), its accuracy is at least the floor
(``gate_stats.accuracy_floor``) and at least the current champion's; "better" is only claimed when
the exact McNemar test on those images gives p < ``tracking.significance``. The champion is scored
from its registered ONNX file with its own preprocessing. MLflow's evaluation API makes the call:
both sets of predictions go through ``mlflow.models.evaluate`` (each in a child run of the pipeline
run) and ``mlflow.validate_evaluation_results`` checks the thresholds. A champion with another
label set is never compared against (its outputs mean something else). ``docs/deployment.md``
states the rule; ``apply_aliases`` moves the aliases, last, and only for a FINISHED run.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import mlflow.data
import mlflow.models
import numpy as np
import pandas as pd
from mlflow.models import EvaluationResult, MetricThreshold
from mlflow.models.evaluation.validation import ModelValidationFailedException

from components.common.config import TrackingConfig
from components.common.intervals import wilson_interval
from components.deploy import tracking
from components.deploy.gate_stats import accuracy_floor, compare_paired
from components.deploy.heldout import HeldOut, predict_labels

logger = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
METRIC = "accuracy_score"  # MLflow's classifier metric the thresholds apply to


@dataclass(frozen=True)
class Candidate:
    """A model to score: its ONNX file, labels in output order and preprocessing mapping."""

    onnx_path: Path
    labels: list[str]
    preprocessing: dict[str, Any]


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict and every number behind it (logged, tagged and printed as is)."""

    mode: str  # tracking.promote: auto | never | force
    verdict: str  # promoted-first | promoted-better | promoted-no-worse | rejected-worse | ...
    promote: bool  # whether champion should move to the challenger
    reason: str
    model_name: str
    challenger_version: int
    champion_version: int | None
    split: str
    n: int
    floor: float
    significance: float
    challenger_accuracy: float | None = None
    challenger_interval: tuple[float, float] | None = None
    champion_accuracy: float | None = None
    champion_interval: tuple[float, float] | None = None
    challenger_only_correct: int | None = None
    champion_only_correct: int | None = None
    p_value: float | None = None
    mlflow_validation: str = "not run"
    evaluation_runs: dict[str, str] = field(default_factory=dict)  # role -> MLflow child run id

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """Numeric fields for the run's metrics (absent numbers left out)."""
        values = {
            "gate_challenger_accuracy": self.challenger_accuracy,
            "gate_champion_accuracy": self.champion_accuracy,
            "gate_p_value": self.p_value,
            "gate_n": self.n,
            "gate_floor": self.floor,
            "gate_promoted": float(self.promote),
        }
        return {k: float(v) for k, v in values.items() if v is not None}

    def tags(self) -> dict[str, str]:
        """Tags for the registered version: the verdict readable in the registry itself."""
        values = {
            "verdict": self.verdict,
            "mode": self.mode,
            "champion_version": self.champion_version,
            "challenger_accuracy": self.challenger_accuracy,
            "champion_accuracy": self.champion_accuracy,
            "p_value": self.p_value,
            "n": self.n,
            "split": self.split,
            "reason": self.reason,
        }
        return {f"promotion.{k}": "" if v is None else str(v) for k, v in values.items()}

    def markdown(self) -> str:
        """The report section."""

        def row(role: str, version: int | None, acc: float | None, ci: Any) -> str:
            if acc is None:
                return f"| {role} | {version or '-'} | - | - |"
            return f"| {role} | {version} | {acc:.4f} | {ci[0]:.4f} - {ci[1]:.4f} |"

        lines = [
            "## Promotion",
            "",
            f"**{self.verdict}** (promote={self.mode}): {self.reason}",
            "",
            "| model | version | accuracy | 95% interval (Wilson) |",
            "|---|---|---|---|",
            row(
                "challenger",
                self.challenger_version,
                self.challenger_accuracy,
                self.challenger_interval,
            ),
            row("champion", self.champion_version, self.champion_accuracy, self.champion_interval),
            "",
            f"{self.n} images of the {self.split} split; accuracy floor {self.floor:.3f}.",
        ]
        if self.p_value is not None:
            lines.append(
                f"Paired outcomes: challenger alone right on {self.challenger_only_correct}, "
                f"champion alone right on {self.champion_only_correct}; exact McNemar "
                f"p = {self.p_value:.4f} (significant below {self.significance})."
            )
        lines += [f"MLflow validation: {self.mlflow_validation}.", ""]
        return "\n".join(lines)


def run_gate(
    model_name: str,
    challenger_version: int,
    challenger: Candidate,
    held: HeldOut,
    cfg: TrackingConfig,
    *,
    run_id: str,
    tracking_uri: str,
    work_dir: Path,
) -> GateResult:
    """Score the challenger (and the champion, if any) on ``held`` and decide; moves nothing.

    MLflow's evaluations are logged to child runs of ``run_id``; the champion is downloaded into
    ``work_dir``.
    """
    labels = list(challenger.labels)
    champion_version = tracking.alias_version(model_name, CHAMPION, tracking_uri=tracking_uri)
    base: dict[str, Any] = {
        "mode": cfg.promote,
        "model_name": model_name,
        "challenger_version": challenger_version,
        "champion_version": champion_version,
        "split": held.split,
        "n": len(held.paths),
        "floor": accuracy_floor(cfg.min_accuracy, len(labels)),
        "significance": cfg.significance,
    }
    if not held.paths:
        return _decide(base, "rejected-no-held-out", "no test or validation images to judge on")

    targets = _indices(list(held.labels), labels)
    mine = _indices(_predict(challenger, held), labels)
    mine_right = mine == targets
    base["challenger_accuracy"] = float(mine_right.mean())
    base["challenger_interval"] = wilson_interval(int(mine_right.sum()), len(targets))

    champion = None
    if champion_version is not None:
        path, champion_labels, champion_prep = tracking.load_registered(
            f"models:/{model_name}/{champion_version}",
            tracking_uri,
            work_dir / f"champion-v{champion_version}",
        )
        if set(champion_labels) != set(labels):
            return _decide(
                base,
                "refused-label-mismatch",
                f"champion v{champion_version} has labels {sorted(champion_labels)}, the "
                f"challenger {sorted(labels)}: their outputs mean different things",
            )
        champion = Candidate(path, champion_labels, champion_prep)

    evaluations = {
        CHALLENGER: _evaluate(
            mine,
            targets,
            len(labels),
            held,
            f"gate-challenger-v{challenger_version}",
            run_id,
            tracking_uri,
        )
    }
    if champion is not None:
        theirs = _indices(_predict(champion, held), labels)
        paired = compare_paired(mine_right, theirs == targets)
        base |= {
            "champion_accuracy": paired.champion_accuracy,
            "champion_interval": wilson_interval(paired.champion_correct, paired.n),
            "challenger_only_correct": paired.challenger_only,
            "champion_only_correct": paired.champion_only,
            "p_value": paired.p_value,
        }
        evaluations[CHAMPION] = _evaluate(
            theirs,
            targets,
            len(labels),
            held,
            f"gate-champion-v{champion_version}",
            run_id,
            tracking_uri,
        )
    base["evaluation_runs"] = {role: child for role, (_, child) in evaluations.items()}
    passed, base["mlflow_validation"] = _validate(
        evaluations[CHALLENGER][0],
        evaluations[CHAMPION][0] if champion is not None else None,
        base["floor"],
    )
    return _verdict(base, passed)


def _predict(candidate: Candidate, held: HeldOut) -> list[str]:
    return predict_labels(
        candidate.onnx_path, list(candidate.labels), candidate.preprocessing, held.paths
    )


def _indices(names: list[str], labels: list[str]) -> np.ndarray:
    """Label names as indices into the challenger's label order."""
    position = {label: i for i, label in enumerate(labels)}
    return np.array([position[name] for name in names], dtype=np.int64)


def _evaluate(
    predictions: np.ndarray,
    targets: np.ndarray,
    num_classes: int,
    held: HeldOut,
    run_name: str,
    run_id: str,
    tracking_uri: str,
) -> tuple[EvaluationResult, str]:
    """``mlflow.models.evaluate`` on static predictions (label indices), in a new child run of
    ``run_id``."""
    frame = pd.DataFrame({"target": targets, "prediction": predictions})
    dataset = mlflow.data.from_pandas(
        frame, source=held.source, targets="target", predictions="prediction", name=held.split
    )
    child = tracking.start_child_run(run_id, run_name, tracking_uri=tracking_uri)
    with tracking.fluent_run(child, tracking_uri=tracking_uri):
        result = mlflow.models.evaluate(
            data=dataset,
            model_type="classifier",
            evaluator_config={
                "label_list": list(range(max(num_classes, 2))),
                "log_model_explainability": False,
            },
        )
    return result, child


def _validate(
    challenger: EvaluationResult, champion: EvaluationResult | None, floor: float
) -> tuple[bool, str]:
    """``mlflow.validate_evaluation_results``: accuracy >= floor, and >= the champion's."""
    threshold = MetricThreshold(
        threshold=floor,
        # A relative change of at least 0.0: the challenger's accuracy >= the champion's.
        min_relative_change=0.0 if champion is not None else None,
        greater_is_better=True,
    )
    rule = f"{METRIC} >= {floor:.3f}" + (" and >= the champion's" if champion is not None else "")
    try:
        mlflow.validate_evaluation_results({METRIC: threshold}, challenger, champion)
    except ModelValidationFailedException as err:
        return False, f"failed: {' '.join(str(err.message).split())}"
    return True, f"passed ({rule})"


def _decide(base: dict[str, Any], verdict: str, reason: str) -> GateResult:
    """A verdict where the numbers cannot promote; ``force`` still does, ``never`` never does."""
    if base["mode"] == "force":
        return GateResult(**base, verdict="forced", promote=True, reason=f"forced; {reason}")
    return GateResult(**base, verdict=verdict, promote=False, reason=reason)


def _verdict(base: dict[str, Any], passed: bool) -> GateResult:
    acc, floor = base["challenger_accuracy"], base["floor"]
    champ, p, alpha = base.get("champion_accuracy"), base.get("p_value"), base["significance"]
    if champ is None:
        verdict = "promoted-first" if passed else "rejected-below-floor"
        reason = (
            f"no champion yet; accuracy {acc:.4f} "
            f"{'reaches' if passed else 'is below'} the floor {floor:.3f}"
        )
    elif not passed and acc < floor:
        verdict, reason = (
            "rejected-below-floor",
            f"accuracy {acc:.4f} is below the floor {floor:.3f}",
        )
    elif not passed:
        worse = "significantly" if p is not None and p < alpha else "not significantly"
        verdict = "rejected-worse"
        reason = f"accuracy {acc:.4f} < champion's {champ:.4f} ({worse} worse, p = {p:.4f})"
    elif acc > champ and p is not None and p < alpha:
        verdict = "promoted-better"
        reason = f"accuracy {acc:.4f} > champion's {champ:.4f}, significant (p = {p:.4f})"
    else:
        verdict = "promoted-no-worse"
        reason = (
            f"accuracy {acc:.4f} >= champion's {champ:.4f}; the difference is within noise "
            f"(p = {p:.4f}), so the newer model is kept"
        )
    if base["mode"] == "never":
        return GateResult(
            **base, verdict="kept-promote-never", promote=False, reason=f"promote=never; {reason}"
        )
    if base["mode"] == "force":
        return GateResult(**base, verdict="forced", promote=True, reason=f"forced; {reason}")
    return GateResult(
        **base, verdict=verdict, promote=verdict.startswith("promoted"), reason=reason
    )


def apply_aliases(
    gate: GateResult, registered: tracking.RegisteredModel, tracking_uri: str
) -> tuple[str, ...]:
    """Point ``challenger`` at the new version, and ``champion`` when the gate says so.

    The last step of a run: it refuses (moves nothing) unless the version's run has FINISHED, so a
    failed run never moves an alias, whatever ``promote`` says.
    """
    status = tracking.run_status(registered.run_id, tracking_uri=tracking_uri)
    if status != "FINISHED":
        logger.warning(
            "run %s is %s: aliases of %s stay where they are",
            registered.run_id,
            status,
            registered.name,
        )
        return ()
    moved = [CHALLENGER]
    tracking.set_alias(registered.name, CHALLENGER, registered.version, tracking_uri=tracking_uri)
    if gate.promote:
        tracking.set_alias(registered.name, CHAMPION, registered.version, tracking_uri=tracking_uri)
        moved.append(CHAMPION)
    logger.info("%s v%d: aliases %s", registered.name, registered.version, ", ".join(moved))
    return tuple(moved)
