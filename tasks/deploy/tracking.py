"""Tracking task: everything the run measured and made, logged to MLflow; the model registered."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.common.config import PipelineConfig, dump_config
from components.common.plan import TransferPlan
from components.data.counting import DatasetCounts
from components.data.validation import ValidationReport
from components.deploy import tracking
from components.deploy.export import ExportResult
from components.engine.images import Preprocessing
from components.similarity.scores import SimilarityReport
from components.training.cases import TrainResult
from components.training.evaluation import SplitMetrics
from tasks.common.context import RunContext
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


def _flatten(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(f"{name}.", value))
        else:
            out[name] = value
    return out


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
) -> tuple[str, tracking.RegisteredModel, str]:
    """One MLflow run per pipeline run: config, decision, curves, metrics, artifacts, model version."""
    uri = tracking.resolve_tracking_uri(cfg.tracking, cfg.output_dir)
    tags = {"dataset": ctx.name, "case": str(plan.case), "data_root": str(ctx.data_root)}
    run_id = tracking.start_run(cfg.tracking, cfg.output_dir, ctx.name, tags)
    try:
        params = {
            **_flatten("config.", cfg.model_dump(mode="json")),
            "case": plan.case,
            "cut": plan.cut,
            "case_reason": plan.reason[:500],
            "image_size": prep.image_size,
            "device": trained.device,
            "num_classes": len(counts.classes),
            "init": trained.spec.init,
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
            },
            "decision.json",
            tracking_uri=uri,
        )
        for name in _RUN_FILES:
            if (ctx.run_dir / name).is_file():
                tracking.log_artifact(run_id, ctx.run_dir / name, "report", tracking_uri=uri)
        tracking.log_artifact(run_id, validation.json_path, "validation", tracking_uri=uri)
        if (ctx.run_dir / "profile").is_dir():
            tracking.log_artifact(run_id, ctx.run_dir / "profile", "profile", tracking_uri=uri)
        if validation.docs_path is not None:
            tracking.log_artifact(
                run_id, validation.docs_path.parent, "validation/data_docs", tracking_uri=uri
            )
        registered = tracking.register_onnx_model(
            run_id,
            exported.onnx_path,
            cfg.tracking.registered_model or ctx.name,
            list(counts.classes),
            prep.to_dict(),
            cfg.tracking.alias,
            uri,
            extra_metadata={"case": plan.case, "cut": plan.cut, "backbone": cfg.backbone},
        )
    except Exception:
        tracking.finish_run(run_id, "FAILED", tracking_uri=uri)
        raise
    tracking.finish_run(run_id, "FINISHED", tracking_uri=uri)
    get_run_logger().info("MLflow run %s; registered %s", run_id, registered.model_uri)
    return run_id, registered, uri
