"""Training and evaluation tasks."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components import evaluation, training
from components.backbones import load_backbone
from components.config import PipelineConfig
from components.dataset import read_manifest
from components.images import Preprocessing
from components.models import load_model
from components.splits import load_splits
from components.strategy import TransferPlan
from tasks.policy import transient_only


@task(
    name="train",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=transient_only,
    cache_policy=NO_CACHE,
)
def train_model(
    usable_manifest: Path,
    classes: list[str],
    plan: TransferPlan,
    prep: Preprocessing,
    cfg: PipelineConfig,
    cache_dir: Path,
    run_dir: Path,
) -> training.TrainResult:
    """Train the planned case; a retried attempt resumes from its last epoch checkpoint."""
    backbone = load_backbone(cfg.backbone, cfg.backbone_weights)
    splits = load_splits(
        read_manifest(usable_manifest), classes, backbone, prep, cache_dir, cfg.train.num_workers
    )
    job = training.TrainingJob(
        plan, backbone, splits["train"], splits["val"], classes, cfg.train, prep, run_dir, cfg.seed
    )
    result = training.train_case(job)
    evaluation.plot_learning_curve(
        result.history, run_dir / "learning_curve.png", f"case {plan.case}"
    )
    get_run_logger().info(
        "trained case %d on %s in %.1f s: val accuracy %.4f",
        plan.case,
        result.device,
        result.seconds,
        result.val_accuracy,
    )
    return result


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_model(
    usable_manifest: Path,
    trained: training.TrainResult,
    prep: Preprocessing,
    cfg: PipelineConfig,
    cache_dir: Path,
    run_dir: Path,
) -> dict[str, evaluation.SplitMetrics]:
    """Accuracy and per-class precision/recall on the validation and test splits."""
    backbone = load_backbone(cfg.backbone, cfg.backbone_weights)
    model, spec, classes = load_model(trained.model_path, backbone)
    splits = load_splits(
        read_manifest(usable_manifest), classes, backbone, prep, cache_dir, cfg.train.num_workers
    )
    results = {}
    for name in ("val", "test"):
        if name not in splits:
            continue
        data = splits[name]
        logits = evaluation.model_logits(model, spec.cut, data, prep, cfg.train)
        results[name] = evaluation.split_metrics(name, logits, data.labels, classes)
        evaluation.plot_confusion(results[name], classes, run_dir / f"confusion_{name}.png")
        get_run_logger().info(
            "%s accuracy %.4f (n=%d)", name, results[name].accuracy, results[name].n
        )
    return results
