"""Training the chosen case: a head on cached features (1, 2) or a fine-tune (3, 4).

A pre-trained fine-tune starts from the frozen linear probe's head, and that start competes with
every epoch on the validation split: a fine-tune that never beats it keeps it. Case 4 defines
success as a fine-tuned epoch beating both ``train.success_accuracy`` and the probe; a pre-trained
fine-tune that fails it is followed by one from random initialisation, and the better is kept.
Every attempt is recorded.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from components.common.config import TrainConfig
from components.common.plan import TransferPlan
from components.common.progress import ProgressCallback, within
from components.data.counting import IMBALANCE_RATIO
from components.data.splits import SplitData
from components.engine.backbones import Backbone
from components.engine.extraction import choose_device
from components.engine.images import Preprocessing
from components.training.checkpoints import exclusive
from components.training.distributed import resolve_processes
from components.training.distributed_finetune import launch_distributed
from components.training.finetune import FinetuneResult, FinetuneSettings, RaceRule, finetune
from components.training.heads import HeadFit, fit_linear_head
from components.training.models import FrozenTransferModel, ModelSpec, build_model, save_model
from components.training.warm_start import WarmStart, continue_training

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    model_path: Path
    spec: ModelSpec
    labels: list[str]
    val_accuracy: float
    history: tuple[dict[str, float], ...]
    attempts: tuple[dict[str, object], ...]
    device: str
    seconds: float
    notes: dict[str, object] = field(default_factory=dict)
    checkpoint_key: str | None = None  # names the checkpoint folder (``training.checkpoints``)
    # Share of files changed since the weights last started from the pre-trained ones: 0 unless
    # this model continued from an earlier run's (``warm_start``).
    changed_since_full: float = 0.0


def choose_image_size(setting: int | str, median_short_side: int, native: int) -> tuple[int, str]:
    """Input resolution: the native one for photo-sized images, less for small images.

    Upsampling a 28-pixel digit to 224 costs 12x the compute of 64 pixels for a point or two of
    accuracy, so small images are fed at about twice their size (a multiple of 32, at least 64).
    """
    if setting != "auto":
        return int(setting), f"{setting} px set in configuration"
    if median_short_side >= 0.75 * native:
        return (
            native,
            f"{native} px, the backbone's native size (median short side {median_short_side} px)",
        )
    size = int(min(native, max(64, math.ceil(2 * median_short_side / 32) * 32)))
    return size, (
        f"{size} px: about twice the median short side of {median_short_side} px, below the native "
        f"{native} px to save compute on small images"
    )


@dataclass(frozen=True)
class TrainingJob:
    """Everything one training run reads, passed as one value."""

    plan: TransferPlan
    backbone: Backbone
    train: SplitData
    val: SplitData
    classes: list[str]
    cfg: TrainConfig
    prep: Preprocessing
    run_dir: Path
    seed: int
    race: RaceRule | None = None  # verification: stop a fine-tune once its comparison is settled
    # Where fine-tune checkpoints go; None: run_dir/checkpoints. The flow passes one named for the
    # data and the configuration (``training.checkpoints``), so the next run resumes a killed one.
    checkpoint_dir: Path | None = None
    # Hears the fine-tune's progress (one share per initialisation tried); frozen heads are quick.
    on_progress: ProgressCallback | None = None
    warm_start: WarmStart | None = None  # fine-tunes: continue from the last run's weights


_Trained = tuple[torch.nn.Module, ModelSpec, float, tuple[dict[str, float], ...]]


def class_weights(job: TrainingJob) -> tuple[float, ...] | None:
    """Per-class loss weights (every class weighs alike) when asked, or, on ``auto``, when the
    largest class has more than ``IMBALANCE_RATIO`` times the training images of the smallest."""
    counts = np.bincount(job.train.labels, minlength=len(job.classes)).astype(float)
    mode = job.cfg.class_weights
    imbalanced = counts.max() > IMBALANCE_RATIO * max(counts.min(), 1.0)
    if mode == "off" or (mode == "auto" and not imbalanced):
        return None
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return tuple(float(w) for w in weights)


def _fit_head(job: TrainingJob, cut: str) -> HeadFit:
    cfg = job.cfg
    return fit_linear_head(
        job.train.features[cut],
        job.train.labels,
        job.val.features[cut],
        job.val.labels,
        len(job.classes),
        job.seed,
        cfg.head_cv_folds,
        balanced=class_weights(job) is not None,
        groups=job.train.groups,
    )


def _frozen(job: TrainingJob) -> tuple[_Trained, list[dict[str, object]]]:
    cut = job.plan.cut or "head"
    fit = _fit_head(job, cut)
    model = FrozenTransferModel(copy.deepcopy(job.backbone.prefix(cut)), fit.head).eval()
    spec = ModelSpec(
        job.backbone.name, job.plan.case, cut, len(job.classes), "pretrained", job.prep.image_size
    )
    attempt = {
        "init": "pretrained",
        "trained": f"linear head after {cut}",
        "val_accuracy": fit.val_accuracy,
        "C": fit.c,
        "cv_accuracy": fit.cv_accuracy,
        "cv_folds": fit.cv_folds,
        "class_weights": class_weights(job) is not None,
        "cv_curve": None
        if fit.curve is None
        else {"C": list(fit.curve.grid), "accuracy": list(fit.curve.means)},
    }
    return (model, spec, fit.val_accuracy, ()), [attempt]


def _finetune_settings(job: TrainingJob) -> FinetuneSettings:
    cfg = job.cfg
    return FinetuneSettings(
        epochs=cfg.finetune_epochs,
        lr=cfg.finetune_lr,
        body_lr_factor=0.1,
        weight_decay=cfg.weight_decay,
        label_smoothing=cfg.label_smoothing,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        flip=job.plan.similarity == "similar",
        freeze_bn=True,
        race=job.race,
        class_weights=class_weights(job),
    )


def _run_finetune(
    job: TrainingJob,
    model: torch.nn.Module,
    spec: ModelSpec,
    settings: FinetuneSettings,
    checkpoint: Path,
    device: torch.device,
    on_progress: ProgressCallback | None,
) -> FinetuneResult:
    processes = resolve_processes(job.cfg.processes, device)
    run = partial(finetune, on_progress=on_progress)
    if processes > 1:  # progress stays in the torchrun processes' own output
        run = partial(launch_distributed, backbone=job.backbone, spec=spec, processes=processes)
    return run(
        model,
        (job.train.paths, job.train.labels.tolist()),
        (job.val.paths, job.val.labels.tolist()),
        job.prep,
        settings,
        checkpoint,
        device,
        job.seed,
    )


def _finetuned(job: TrainingJob, device: torch.device) -> tuple[_Trained, list[dict[str, object]]]:
    attempts: list[dict[str, object]] = []
    if job.warm_start is not None:
        share = within(job.on_progress, 0.0, 1.0)

        def train(
            model: torch.nn.Module, spec: ModelSpec, settings: FinetuneSettings, checkpoint: Path
        ) -> FinetuneResult:
            return _run_finetune(job, model, spec, settings, checkpoint, device, share)

        continued, attempt = continue_training(
            job.warm_start,
            job.backbone,
            _finetune_settings(job),
            len(job.val.labels),
            (job.checkpoint_dir or job.run_dir / "checkpoints") / "warm.pt",
            train,
        )
        attempts.append(attempt)
        if continued is not None:
            model, spec, result = continued
            return (model, spec, result.val_accuracy, result.history), attempts
    cfg, plan = job.cfg, job.plan
    probe = _fit_head(job, "head")
    settings = _finetune_settings(job)
    attempts.append(
        {"init": "frozen probe", "val_accuracy": probe.val_accuracy, "trained": "linear head only"}
    )
    best: _Trained | None = None
    inits = ["pretrained"] if plan.case == 3 else ["pretrained", "random"]
    for i, init in enumerate(inits):
        spec = ModelSpec(
            job.backbone.name, plan.case, None, len(job.classes), init, job.prep.image_size
        )
        model = build_model(spec, job.backbone)
        if (
            init == "pretrained"
        ):  # linear probe first, then fine-tune: the body starts from a sane head
            model.get_classifier().load_state_dict(probe.head.state_dict())
        share = within(job.on_progress, i / len(inits), (i + 1) / len(inits))
        result = _run_finetune(
            job,
            model,
            spec,
            replace(settings, keep_start=True)
            if init == "pretrained"
            else _random_init_settings(settings),
            (job.checkpoint_dir or job.run_dir / "checkpoints") / f"{init}.pt",
            device,
            share,
        )
        attempts.append(
            {
                "init": init,
                "val_accuracy": result.val_accuracy,
                "best_epoch": result.best_epoch,
                "seconds": result.seconds,
                "resumed_from_epoch": result.resumed_from_epoch,
                "raced": result.raced,
                **(
                    {}
                    if result.start_accuracy is None
                    else {
                        "start_val_accuracy": result.start_accuracy,
                        "kept": "start" if result.best_epoch < 0 else "fine-tuned",
                    }
                ),
            }
        )
        if result.best_epoch < 0:
            log.info(
                "the fine-tune never beat its starting linear probe (%.4f on validation): "
                "the probe's weights are kept",
                result.val_accuracy,
            )
        if best is None or result.val_accuracy > best[2]:
            best = (model, spec, result.val_accuracy, result.history)
        if result.raced is not None:  # a verification race is settled: no fallback needed
            break
        if init == "pretrained" and plan.case == 4:
            target = max(cfg.success_accuracy, probe.val_accuracy)
            success = result.best_epoch >= 0 and result.val_accuracy >= target  # a trained epoch
            attempts[-1]["success"] = success
            log.info(
                "case 4: pre-trained fine-tune %s vs target %.4f -> %s",
                f"{result.val_accuracy:.4f}" if result.best_epoch >= 0 else "never beat its start",
                target,
                "kept" if success else "trying random initialisation",
            )
            if success:
                break
    assert best is not None
    return best, attempts


def _random_init_settings(settings: FinetuneSettings) -> FinetuneSettings:
    # From scratch every layer is new: one learning rate for all, more patience, and BatchNorm
    # statistics learned from the data (there are no stored ones to keep).
    return replace(settings, body_lr_factor=1.0, patience=settings.patience + 2, freeze_bn=False)


def train_case(job: TrainingJob) -> TrainResult:
    """Train ``job.plan.case`` and save the model under ``job.run_dir``."""
    start = time.perf_counter()
    torch.manual_seed(job.seed)
    device = choose_device(job.cfg.device)
    if job.plan.case in (1, 2):
        trained, attempts = _frozen(job)
    else:
        with exclusive(job.checkpoint_dir):
            trained, attempts = _finetuned(job, device)
    model, spec, acc, history = trained
    classes, plan, run_dir = job.classes, job.plan, job.run_dir
    path = save_model(model, spec, classes, run_dir / "model.pt")
    log.info("case %d trained on %s: val accuracy %.4f", plan.case, device, acc)
    return TrainResult(
        model_path=path,
        spec=spec,
        labels=classes,
        val_accuracy=acc,
        history=history,
        attempts=tuple(attempts),
        device=str(device),
        seconds=time.perf_counter() - start,
        changed_since_full=_changed_since_full(job, attempts),
    )


def _changed_since_full(job: TrainingJob, attempts: list[dict[str, object]]) -> float:
    warm = next((a for a in attempts if a["init"] == "warm start"), None)
    if job.warm_start is None or warm is None or not warm["success"]:
        return 0.0
    return job.warm_start.changed_since_full
