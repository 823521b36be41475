"""Continuing from the last run's fine-tuned weights when only a little of the data changed.

A scheduled retrain after 5% new images would spend the whole fine-tune again to reach about the
model it already has. Continuing from that model for an epoch at a tenth of the learning rate,
on all the data (old and new, so nothing is forgotten), costs a fraction of it. It is safe here
because splits follow each file's own path: no test or validation image of this run was a
training image of the last (the rare file a small class moves out of training refuses it). Three guards keep it honest: the case, classes, input size and
configuration must be those of the last run; the share of files changed since the last training
from the pre-trained weights must stay under ``train.warm_start_max_change`` (so warm starts do not
chain forever); and the continued model must not score below where it started on this run's
validation split, or the full fine-tune runs after all.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from components.common.config import TrainConfig
from components.data.changes import PreviousRun
from components.engine.backbones import Backbone
from components.training.finetune import FinetuneResult, FinetuneSettings
from components.training.models import ModelSpec, load_model

log = logging.getLogger(__name__)

# Fine-tunes a model with these settings, checkpointing to the path (``cases._run_finetune``).
Trainer = Callable[[nn.Module, ModelSpec, FinetuneSettings, Path], FinetuneResult]

FINE_TUNED = (3, 4)


@dataclass(frozen=True)
class WarmStart:
    """Where a fine-tune starts instead of the pre-trained weights, and how long it runs."""

    model_path: Path
    from_run: str  # MLflow run id of the run that trained those weights
    epochs: int
    lr_factor: float
    changed_since_full: (
        float  # share of files changed since the last full fine-tune, this run's too
    )

    def to_dict(self) -> dict[str, object]:
        return {
            "from_run": self.from_run,
            "model_path": str(self.model_path),
            "epochs": self.epochs,
            "lr_factor": self.lr_factor,
            "changed_since_full": round(self.changed_since_full, 4),
        }


def plan_warm_start(
    previous: PreviousRun | None,
    case: int,
    classes: list[str],
    image_size: int,
    cfg: TrainConfig,
) -> tuple[WarmStart | None, str]:
    """The warm start this fine-tune may take, or None, with the reason either way."""
    if case not in FINE_TUNED:
        return None, "frozen heads are refitted in full (a convex fit of seconds)"
    fresh = "from the pre-trained weights"
    if cfg.warm_start_max_change == 0:
        return None, f"{fresh}: warm starts are off (train.warm_start_max_change = 0)"
    if previous is None:
        return None, f"{fresh}: no earlier successful run to continue from, or --force"
    record = previous.record
    cumulative = record.changed_since_full + previous.change.share
    refusal = next(
        (
            why
            for wrong, why in (
                (
                    not previous.same_config,
                    f"run {record.mlflow_run_id} had another configuration or backbone",
                ),
                (record.case != case, f"run {record.mlflow_run_id} trained case {record.case}"),
                (list(record.classes) != classes, "the classes changed"),
                (record.image_size != image_size, f"it ran at {record.image_size} px"),
                (
                    cumulative > cfg.warm_start_max_change,
                    f"{cumulative:.0%} of the files changed since the last training from the "
                    f"pre-trained weights, over {cfg.warm_start_max_change:.0%}",
                ),
                (not Path(record.model_path).is_file(), f"its model {record.model_path} is gone"),
                (
                    previous.change.left_training > 0,
                    f"{previous.change.left_training} image(s) it trained on are held out now",
                ),
            )
            if wrong
        ),
        None,
    )
    if refusal is not None:
        return None, f"{fresh}: {refusal}"
    warm = WarmStart(
        Path(record.model_path),
        record.mlflow_run_id,
        cfg.warm_start_epochs,
        cfg.warm_start_lr_factor,
        cumulative,
    )
    return warm, (
        f"from run {record.mlflow_run_id}'s weights for {warm.epochs} epoch(s) at "
        f"{warm.lr_factor:g} x the learning rate: {previous.change.sentence()}, "
        f"{cumulative:.0%} since the last full fine-tune"
    )


def continue_training(
    warm: WarmStart,
    backbone: Backbone,
    base: FinetuneSettings,
    n_val: int,
    checkpoint: Path,
    train: Trainer,
) -> tuple[tuple[nn.Module, ModelSpec, FinetuneResult] | None, dict[str, object]]:
    """The last run's model trained on for ``warm.epochs`` at ``warm.lr_factor`` of the learning
    rates, and the attempt's record; None (the full fine-tune runs then) when it ends more than one
    standard error below where it started on the validation split."""
    model, spec, _ = load_model(warm.model_path, backbone)
    settings = replace(
        base, epochs=warm.epochs, lr=base.lr * warm.lr_factor, warmup_epochs=0, measure_start=True
    )
    result = train(model, spec, settings, checkpoint)
    start = result.start_accuracy  # None from a checkpoint that did not record it
    noise = 0.0 if start is None else math.sqrt(start * (1 - start) / max(n_val, 1))
    kept = start is None or result.val_accuracy >= start - noise
    attempt = {
        "init": "warm start",
        **warm.to_dict(),
        "start_val_accuracy": start,
        "val_accuracy": result.val_accuracy,
        "best_epoch": result.best_epoch,
        "seconds": result.seconds,
        "resumed_from_epoch": result.resumed_from_epoch,
        "success": kept,
    }
    log.info(
        "warm start from run %s: val accuracy %s -> %.4f, %s",
        warm.from_run,
        "?" if start is None else f"{start:.4f}",
        result.val_accuracy,
        "kept" if kept else "fine-tuning from the pre-trained weights instead",
    )
    return ((model, spec, result) if kept else None), attempt
