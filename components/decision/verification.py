"""Budgeted verification: the size x similarity rule is a prior, so check it where it is close.

The rule can be wrong near its thresholds: where fine-tuning starts to beat a frozen backbone
depends on the data, not only on a count of images per class. The weaker of the two judgements is size (where fine-tuning starts to pay depends on the
data), so the runner-up is the same similarity with the other size: frozen <-> fine-tuned. The
similarity axis needs no such check: case 2's probe already scores every cut, the head included.

Both cases are trained on a nested split of the training images (the validation split stays
untouched for the final, honest figure) and the runner-up replaces the rule's case only if it wins
by more than the noise of the held-out set. In ``auto`` mode this runs when the evidence is close (images per class
near the size threshold, or an uncertain similarity call) and the measured cost estimate fits the
budget; ``on`` runs it regardless.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
from sklearn.model_selection import train_test_split

from components.common.config import StrategyConfig
from components.common.plan import TransferPlan
from components.data.splits import SplitData
from components.decision.costs import case_seconds
from components.training.cases import TrainingJob, train_case

log = logging.getLogger(__name__)

RUNNER_UP = {1: 3, 2: 4, 3: 1, 4: 2}


@dataclass(frozen=True)
class VerificationDecision:
    """Whether the runner-up is checked, and the numbers behind that call."""

    mode: str
    run: bool
    rule_case: int
    runner_up: int
    estimated_seconds: float | None  # measured only when the cost matters
    budget_seconds: float
    reason: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _size_ratio(plan: TransferPlan) -> float:
    n, threshold = max(plan.min_images_per_class, 1), plan.large_images_per_class
    return max(n / threshold, threshold / n)


def evidence_is_close(plan: TransferPlan, cfg: StrategyConfig) -> bool:
    """Near the size threshold (within ``verify_size_factor``) or an uncertain similarity call."""
    return plan.uncertain or _size_ratio(plan) <= cfg.verify_size_factor


def decide_verification(
    plan: TransferPlan,
    cfg: StrategyConfig,
    n_train: int,
    epochs: int,
    images_per_second: Callable[[], float],
) -> VerificationDecision:
    """Run the check when asked to (``on``), or (``auto``) when the evidence is close and the
    estimated cost fits the budget. The training rate is measured only when the cost matters."""
    runner_up = RUNNER_UP[plan.case]
    inner_val = round(n_train * cfg.verify_fraction)

    def estimate() -> float:
        rate = images_per_second()
        return sum(
            case_seconds(c, n_train - inner_val, inner_val, epochs, rate)
            for c in (plan.case, runner_up)
        )

    seconds = None
    if cfg.verify == "off":
        run, why = False, "verification is off"
    elif plan.overridden:
        run, why = False, "the case was set by configuration"
    elif cfg.verify == "on":
        run, why, seconds = True, "verification is on", estimate()
    elif not evidence_is_close(plan, cfg):
        ratio = _size_ratio(plan)
        run, why = (
            False,
            f"the evidence is not close ({plan.min_images_per_class} images per class is "
            f"{ratio:.1f}x from the {plan.large_images_per_class} threshold, beyond the "
            f"{cfg.verify_size_factor:g}x where auto verifies, and the similarity call is certain)",
        )
    else:
        seconds = estimate()
        run = seconds <= cfg.verify_budget_s
        relation = "fits" if run else "exceeds"
        why = f"its estimated {seconds:.0f} s {relation} the {cfg.verify_budget_s:.0f} s budget"
    return VerificationDecision(
        cfg.verify,
        run,
        plan.case,
        runner_up,
        None if seconds is None else round(seconds, 1),
        cfg.verify_budget_s,
        why,
    )


def nested_split(data: SplitData, fraction: float, seed: int) -> tuple[SplitData, SplitData]:
    """A stratified, seeded inner train/validation split of the training split."""
    rows = np.arange(len(data.labels))
    inner_train, inner_val = train_test_split(
        rows, test_size=fraction, stratify=data.labels, random_state=seed
    )

    def subset(idx: np.ndarray) -> SplitData:
        idx = np.sort(idx)
        return SplitData(
            [data.paths[i] for i in idx],
            data.labels[idx],
            {cut: x[idx] for cut, x in data.features.items()},
        )

    return subset(inner_train), subset(inner_val)


def difference_se(accuracy_a: float, accuracy_b: float, n: int) -> float:
    """Standard error of the difference of two accuracies measured on the same ``n`` images
    (treated as independent: conservative, as paired errors are positively correlated)."""
    variance = accuracy_a * (1 - accuracy_a) + accuracy_b * (1 - accuracy_b)
    return math.sqrt(variance / max(n, 1))


@dataclass(frozen=True)
class VerificationResult:
    """Both cases' accuracy on the nested split and the case kept."""

    decision: VerificationDecision
    inner_accuracy: dict[int, float]
    inner_seconds: dict[int, float]
    chosen_case: int
    margin: float
    n_inner_train: int
    n_inner_val: int

    def to_dict(self) -> dict[str, object]:
        return {
            **self.decision.to_dict(),
            "inner_accuracy": {str(k): v for k, v in self.inner_accuracy.items()},
            "inner_seconds": {str(k): v for k, v in self.inner_seconds.items()},
            "chosen_case": self.chosen_case,
            "margin": self.margin,
            "n_inner_train": self.n_inner_train,
            "n_inner_val": self.n_inner_val,
        }

    def sentence(self) -> str:
        rule, other = self.decision.rule_case, self.decision.runner_up
        acc = self.inner_accuracy
        verdict = (
            f"switched to case {other}"
            if self.chosen_case == other
            else f"kept case {rule} (the runner-up must win by more than {self.margin:.3f}, "
            "one standard error of the difference)"
        )
        return (
            f"Verified on a nested split ({self.n_inner_train} training / {self.n_inner_val} held-out "
            f"images): case {rule} scored {acc[rule]:.3f}, runner-up case {other} {acc[other]:.3f}; "
            f"{verdict}."
        )


def verify_runner_up(
    job: TrainingJob, runner_up: TransferPlan, decision: VerificationDecision, cfg: StrategyConfig
) -> VerificationResult:
    """Train the rule's case and the runner-up on a nested split; keep the better."""
    inner_train, inner_val = nested_split(job.train, cfg.verify_fraction, job.seed)
    accuracy: dict[int, float] = {}
    seconds: dict[int, float] = {}
    for plan in (job.plan, runner_up):
        start = time.perf_counter()
        folder = job.run_dir / "verification" / f"case{plan.case}"
        result = train_case(
            replace(job, plan=plan, train=inner_train, val=inner_val, run_dir=folder)
        )
        accuracy[plan.case] = result.val_accuracy
        seconds[plan.case] = round(time.perf_counter() - start, 1)
    margin = cfg.verify_margin_se * difference_se(
        accuracy[job.plan.case], accuracy[runner_up.case], len(inner_val.labels)
    )
    wins = accuracy[runner_up.case] > accuracy[job.plan.case] + margin
    chosen = runner_up.case if wins else job.plan.case
    log.info("verification: %s -> case %d", accuracy, chosen)
    return VerificationResult(
        decision,
        accuracy,
        seconds,
        chosen,
        round(margin, 4),
        len(inner_train.labels),
        len(inner_val.labels),
    )
