"""Training and evaluation tasks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.common.config import PipelineConfig
from components.common.plan import TransferPlan
from components.data.changes import PreviousRun
from components.data.digest import data_digest
from components.data.scan import read_manifest
from components.data.splits import load_splits
from components.engine.extraction import ExtractionEngine
from components.engine.images import Preprocessing
from components.training import cases, checkpoints, evaluation
from components.training.models import load_model
from components.training.warm_start import FINE_TUNED, plan_warm_start
from tasks.common.policy import transient_only
from tasks.common.progress import stage_progress


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
    engine: ExtractionEngine,
    cfg: PipelineConfig,
    run_dir: Path,
    previous: PreviousRun | None = None,
) -> cases.TrainResult:
    """Train the planned case; a retried attempt, or the next run on the same data with the same
    configuration after this one was killed, resumes from the last epoch checkpoint. A fine-tune
    continues from ``previous``'s weights when little changed since (``warm_start``)."""
    manifest = read_manifest(usable_manifest)
    splits = load_splits(manifest, classes, engine, prep)
    key = fine_tune_key(manifest, classes, plan, prep, cfg)
    warm, why = plan_warm_start(previous, plan.case, classes, prep.image_size, cfg.train)
    if plan.case in FINE_TUNED:
        get_run_logger().info("fine-tune %s", why)  # "from the pre-trained weights: ..."
    with stage_progress("train-progress", f"training case {plan.case}") as progress:
        job = cases.TrainingJob(
            plan,
            engine.backbone,
            splits["train"],
            splits["val"],
            classes,
            cfg.train,
            prep,
            run_dir,
            cfg.seed,
            checkpoint_dir=checkpoints.checkpoint_dir(cfg.output_dir, key),
            on_progress=progress,
            warm_start=warm,
        )
        result = cases.train_case(job)
        notes = {**result.notes, "warm_start": why} if plan.case in FINE_TUNED else result.notes
        result = replace(result, checkpoint_key=key, notes=notes)
    if result.history:  # a fine-tune's epochs; a frozen head is one convex fit
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


def fine_tune_key(
    manifest: pd.DataFrame,
    classes: list[str],
    plan: TransferPlan,
    prep: Preprocessing,
    cfg: PipelineConfig,
) -> str:
    """The checkpoint key: the data, and everything of the configuration that shapes the weights."""
    settings = {
        "backbone": cfg.backbone,
        "train": cfg.train.model_dump(mode="json"),
        "seed": cfg.seed,
        "case": plan.case,
        "similarity": plan.similarity,
        "preprocessing": prep.to_dict(),
        "classes": classes,
    }
    return checkpoints.checkpoint_key(data_digest(manifest), settings)


@task(name="clean-checkpoints", cache_policy=NO_CACHE)
def clean_checkpoints(cfg: PipelineConfig, trained: cases.TrainResult) -> int:
    """After a successful run: its checkpoints, and any left idle long enough, are removed."""
    removed = checkpoints.clean_checkpoints(cfg.output_dir, trained.checkpoint_key)
    return len(removed)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_model(
    usable_manifest: Path,
    trained: cases.TrainResult,
    prep: Preprocessing,
    engine: ExtractionEngine,
    cfg: PipelineConfig,
    run_dir: Path,
) -> dict[str, evaluation.SplitMetrics]:
    """Accuracy and per-class precision/recall on the validation and test splits."""
    model, spec, classes = load_model(trained.model_path, engine.backbone)
    splits = load_splits(read_manifest(usable_manifest), classes, engine, prep)
    results = {}
    for name in ("val", "test"):
        if name not in splits:
            continue
        data = splits[name]
        logits = evaluation.model_logits(model, spec.cut, data, prep, engine, cfg.train.batch_size)
        results[name] = evaluation.split_metrics(name, logits, data.labels, classes)
        evaluation.plot_confusion(results[name], classes, run_dir / f"confusion_{name}.png")
        get_run_logger().info(
            "%s accuracy %.4f (n=%d)", name, results[name].accuracy, results[name].n
        )
    return results
