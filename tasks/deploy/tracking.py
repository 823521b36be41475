"""Tracking task: everything the run measured and made, logged to MLflow; the model registered,
judged against the champion, and the aliases moved last."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.common.config import PipelineConfig, dump_config
from components.common.plan import TransferPlan
from components.data.counting import DatasetCounts
from components.data.digest import data_digest
from components.data.scan import read_manifest
from components.data.validation import ValidationReport
from components.deploy import promotion, tracking
from components.deploy.export import ExportResult
from components.deploy.heldout import held_out
from components.deploy.promotion import CHAMPION, Candidate, GateResult
from components.engine.images import Preprocessing, decode_batch
from components.similarity.scores import SimilarityReport
from components.training.cases import TrainResult
from components.training.evaluation import SplitMetrics
from tasks.common.context import RunContext, registered_model_name
from tasks.common.policy import transient_only

_RUN_FILES = (
    "decision.md",
    "similarity_profile.png",
    "probe.png",
    "learning_curve.png",
    "confusion_val.png",
    "confusion_test.png",
    "manifest.csv",
)


@dataclass(frozen=True)
class Published:
    """What the deploy step left behind: the run, the version, the gate and where the aliases are."""

    run_id: str
    tracking_uri: str
    registered: tracking.RegisteredModel
    gate: GateResult
    aliases: tuple[str, ...]  # aliases moved to this version
    champion_version: int | None  # where champion points now

    def promotion_summary(self) -> dict[str, Any]:
        """The gate's numbers plus the registry's state after the run (for the CLI and --json)."""
        name = self.registered.name
        return {
            **self.gate.to_dict(),
            "aliases": list(self.aliases),
            "champion_now": self.champion_version,
            "champion_uri": None if self.champion_version is None else f"models:/{name}@{CHAMPION}",
        }


def _flatten(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(f"{name}.", value))
        else:
            out[name] = value
    return out


def _log_measurements(
    run_id: str,
    uri: str,
    cfg: PipelineConfig,
    validation: ValidationReport,
    counts: DatasetCounts,
    similarity: SimilarityReport,
    plan: TransferPlan,
    trained: TrainResult,
    metrics: dict[str, SplitMetrics],
    exported: ExportResult,
    prep: Preprocessing,
    digest: str,
) -> None:
    params = {
        **_flatten("config.", cfg.model_dump(mode="json")),
        "case": plan.case,
        "cut": plan.cut,
        "case_reason": plan.reason[:500],
        "image_size": prep.image_size,
        "device": trained.device,
        "num_classes": len(counts.classes),
        "init": trained.spec.init,
        "data_digest": digest,
    }
    tracking.log_params(run_id, params, tracking_uri=uri)
    for step, epoch in enumerate(trained.history):
        tracking.log_metrics(run_id, epoch, step=step, tracking_uri=uri)
    for attempt in trained.attempts:  # a frozen head: its CV accuracy along the penalty grid
        curve = attempt.get("cv_curve")
        for step, accuracy in enumerate(curve["accuracy"] if curve else ()):
            tracking.log_metrics(
                run_id, {"head_cv_accuracy": accuracy}, step=step, tracking_uri=uri
            )
    scalars = {f"{name}_accuracy": m.accuracy for name, m in metrics.items()}
    for name, m in metrics.items():  # every accuracy with its n and 95% interval
        scalars |= {
            f"{name}_n": m.n,
            f"{name}_accuracy_low": m.accuracy_low,
            f"{name}_accuracy_high": m.accuracy_high,
            f"{name}_balanced_accuracy": m.balanced_accuracy,
            f"{name}_macro_f1": m.macro_f1,
        }
    scalars |= {
        "similarity": similarity.score,
        "similarity_low": similarity.low,
        "similarity_high": similarity.high,
        "similarity_mean_kl": similarity.mean_kl,
        "similarity_bn": similarity.bn_score or similarity.score,
        "images_total": counts.total,
        "images_min_per_class": counts.min_train_per_class,
        "files_quarantined": len(validation.quarantined),
        "train_seconds": trained.seconds,
        "onnx_max_abs_diff": exported.max_abs_diff,
    }
    if exported.embedded_max_abs_diff is not None:
        scalars["onnx_uint8_max_abs_diff"] = exported.embedded_max_abs_diff
    if similarity.profile is not None:
        scalars |= {
            "profile_mmd2": similarity.profile["mmd2"],
            "profile_frechet_per_dim": similarity.profile["frechet_per_dim"],
            "profile_score": similarity.profile["score"],
        }
    tracking.log_metrics(run_id, scalars, tracking_uri=uri)
    tracking.log_text(run_id, dump_config(cfg), "config.yaml", tracking_uri=uri)
    tracking.log_dict(
        run_id,
        {
            "plan": plan.to_dict(),
            "similarity": similarity.to_dict(),
            "counts": counts.to_dict(),
            "attempts": list(trained.attempts),
            "metrics": {k: m.to_dict() for k, m in metrics.items()},
            "export": {k: str(v) for k, v in asdict(exported).items()},
            "data_digest": digest,
        },
        "decision.json",
        tracking_uri=uri,
    )


def _log_gate(run_id: str, uri: str, gate: GateResult, ctx: RunContext) -> None:
    """The comparison as metrics, params, ``promotion.json`` and a section of the run's report."""
    tracking.log_metrics(run_id, gate.metrics(), tracking_uri=uri)
    tracking.log_params(
        run_id,
        {
            "promotion.mode": gate.mode,
            "promotion.verdict": gate.verdict,
            "promotion.champion_version": gate.champion_version,
            "promotion.challenger_version": gate.challenger_version,
            "promotion.split": gate.split,
        },
        tracking_uri=uri,
    )
    tracking.log_dict(run_id, gate.to_dict(), "promotion.json", tracking_uri=uri)
    report = ctx.run_dir / "decision.md"
    text = report.read_text() if report.is_file() else ""
    report.write_text(f"{text.rstrip()}\n\n{gate.markdown()}")


def _log_files(run_id: str, uri: str, ctx: RunContext, validation: ValidationReport) -> None:
    for name in _RUN_FILES:
        if (ctx.run_dir / name).is_file():
            tracking.log_artifact(run_id, ctx.run_dir / name, "report", tracking_uri=uri)
    tracking.log_artifact(run_id, validation.json_path, "validation", tracking_uri=uri)
    sheet = (validation.near_duplicates or {}).get("contact_sheet")
    if sheet and Path(sheet).is_file():
        tracking.log_artifact(run_id, Path(sheet), "validation", tracking_uri=uri)
    if (ctx.run_dir / "profile").is_dir():
        tracking.log_artifact(run_id, ctx.run_dir / "profile", "profile", tracking_uri=uri)
    if validation.docs_path is not None:
        tracking.log_artifact(
            run_id, validation.docs_path.parent, "validation/data_docs", tracking_uri=uri
        )


@task(
    name="log-and-register",
    retries=2,
    retry_delay_seconds=3,
    retry_condition_fn=transient_only,
    cache_policy=NO_CACHE,
)
def log_and_register(
    ctx: RunContext,
    cfg: PipelineConfig,
    validation: ValidationReport,
    counts: DatasetCounts,
    similarity: SimilarityReport,
    plan: TransferPlan,
    trained: TrainResult,
    metrics: dict[str, SplitMetrics],
    exported: ExportResult,
    prep: Preprocessing,
) -> Published:
    """One MLflow run per pipeline run: config, decision, curves, metrics, the training data, the
    model version and the promotion gate's comparison; the aliases move after the run FINISHED."""
    uri = tracking.resolve_tracking_uri(cfg.tracking, cfg.output_dir)
    manifest = read_manifest(validation.usable_manifest_path)
    digest = data_digest(manifest)
    name = registered_model_name(ctx, cfg)
    labels = list(counts.classes)
    tags = {"dataset": ctx.name, "case": str(plan.case), "data_root": str(ctx.data_root)}
    run_id = tracking.start_run(cfg.tracking, cfg.output_dir, ctx.name, tags)
    try:
        _log_measurements(
            run_id,
            uri,
            cfg,
            validation,
            counts,
            similarity,
            plan,
            trained,
            metrics,
            exported,
            prep,
            digest,
        )
        tracking.log_dataset(
            run_id,
            manifest,
            source=str(ctx.data_root),
            name=ctx.name,
            digest=digest,
            context="training",
            tracking_uri=uri,
        )
        held = held_out(manifest, str(ctx.data_root))
        registered = tracking.register_onnx_model(
            run_id,
            exported.onnx_path,
            name,
            labels,
            prep.to_dict(),
            uri,
            extra_metadata={
                "case": plan.case,
                "cut": plan.cut,
                "backbone": cfg.backbone,
                "data_digest": digest,
            },
            input_example=decode_batch(held.paths[:1], prep) if held.paths else None,
            extra_files=None
            if exported.embedded_path is None
            else {exported.embedded_path.name: exported.embedded_path},
        )
        gate = promotion.run_gate(
            name,
            registered.version,
            Candidate(exported.onnx_path, labels, prep.to_dict()),
            held,
            cfg.tracking,
            run_id=run_id,
            tracking_uri=uri,
            work_dir=ctx.run_dir / "promotion",
        )
        _log_gate(run_id, uri, gate, ctx)
        _log_files(run_id, uri, ctx, validation)
        tracking.tag_version(name, registered.version, gate.tags(), tracking_uri=uri)
    except Exception:
        tracking.finish_run(run_id, "FAILED", tracking_uri=uri)
        raise
    tracking.finish_run(run_id, "FINISHED", tracking_uri=uri)
    # Last: every artifact is stored and the run is FINISHED before any alias moves.
    moved = promotion.apply_aliases(gate, registered, uri)
    champion = tracking.alias_version(name, CHAMPION, tracking_uri=uri)
    get_run_logger().info(
        "MLflow run %s; registered %s; %s (aliases: %s)",
        run_id,
        registered.model_uri,
        gate.verdict,
        ", ".join(moved) or "none",
    )
    return Published(run_id, uri, registered, gate, moved, champion)
