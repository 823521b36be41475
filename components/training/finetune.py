"""Fine-tuning the whole network (cases 3 and 4), checkpointed every epoch so a retry resumes.

The recipe is the careful one: a head fitted first on frozen features, AdamW with a lower learning
rate for the pre-trained body, one warm-up epoch then cosine decay, label smoothing, early stopping
with the best weights restored; mixed precision and channels-last on CUDA.

The same function runs in every process of a torchrun job (``components.training.distributed_finetune``):
there the model is wrapped in DistributedDataParallel, each process trains on its share of the
training set and validates its shard of the validation set, and the shards' sums are added up so
every process takes the same decisions (best epoch, early stop). Only rank 0 writes the checkpoint,
and every rank resumes from the copy rank 0 read. ``batch_size`` is per process.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from components.common.progress import Progress, ProgressCallback, within
from components.engine.images import EvalTransform, ImageFiles, Preprocessing, train_transform
from components.training import distributed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RaceRule:
    """Stop a fine-tune once it is clearly behind or clearly ahead of a known rival score.

    Used when verification races a fine-tune against a frozen case already scored on the same
    held-out images: from ``after_epoch`` (0-based) on, a best validation accuracy so far below
    ``behind`` or above ``ahead`` settles the question, and further epochs would only cost time.
    The best so far, not the last epoch's: the best epoch's weights are what the fine-tune keeps
    and reports (its start's too, with ``keep_start``), so a fine-tune whose last epoch dipped is
    not stopped as "behind" while the score it reports leads.
    """

    after_epoch: int
    behind: float
    ahead: float

    def verdict(self, epoch: int, accuracies: Sequence[float]) -> str | None:
        """The verdict after ``epoch`` given every epoch's validation accuracy so far."""
        if epoch < self.after_epoch or not accuracies:
            return None
        accuracy = max(accuracies)
        if accuracy < self.behind:
            return "behind"
        if accuracy > self.ahead:
            return "ahead"
        return None


@dataclass(frozen=True)
class FinetuneSettings:
    """What one fine-tuning run needs beyond the model and the data."""

    epochs: int
    lr: float
    body_lr_factor: float  # pre-trained layers learn this much slower than the new head
    weight_decay: float
    label_smoothing: float
    batch_size: int  # per process when distributed
    num_workers: int
    patience: int = 3
    flip: bool = True  # horizontal flips suit photos, not digits or text
    # Keep BatchNorm layers on their stored statistics while the weights train. From pre-trained
    # weights this is what makes "linear probe, then fine-tune" coherent: the probe's head was fitted
    # on features normalised by those statistics, and batch statistics of data far from the source
    # (digits vs ImageNet) would hand it very different features and a loss spike at step one.
    freeze_bn: bool = False
    race: RaceRule | None = None  # verification only: stop once the comparison is settled
    class_weights: tuple[float, ...] | None = None  # imbalanced data: every class weighs alike
    # Epochs of linear learning-rate warm-up before the cosine decay. A warm start continues from
    # trained weights, so it needs none: it decays from its (lower) peak at once.
    warmup_epochs: int = 1
    # Score the starting weights on the validation split first (``FinetuneResult.start_accuracy``):
    # a warm start must not end worse than it began.
    measure_start: bool = False
    # The starting weights compete with every epoch's, as epoch "-1": a fine-tune from a linear
    # probe that never beats the probe on validation keeps the probe (magnetic_tile: best epoch
    # 0.527 against its start's 0.582), and patience counts from the start. Implies measure_start.
    keep_start: bool = False


@dataclass(frozen=True)
class FinetuneResult:
    val_accuracy: float
    best_epoch: int  # 0-based; -1 when the kept start beat every epoch (``keep_start``)
    history: tuple[dict[str, float], ...]
    resumed_from_epoch: int | None
    seconds: float
    samples_seen: tuple[int, ...] = ()  # training samples each process stepped on in this call
    raced: str | None = None  # "behind" / "ahead" when a race rule stopped it, with the epoch
    start_accuracy: float | None = None  # the starting weights', with measure_start or keep_start


def _loader(
    dataset: ImageFiles,
    settings: FinetuneSettings,
    shuffle: bool,
    device: torch.device,
    seed: int,
) -> DataLoader:
    sampler = distributed.train_sampler(dataset, seed) if shuffle else None
    per_process = len(sampler) if sampler is not None else len(dataset)
    return DataLoader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=settings.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=settings.num_workers > 0,
        # Loader workers of different processes must not draw the same augmentations.
        generator=torch.Generator().manual_seed(seed + distributed.rank()),
        drop_last=shuffle and per_process > settings.batch_size,
    )


@torch.inference_mode()
def predict_logits(
    model: nn.Module, loader: DataLoader, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels for every image in ``loader``."""
    model.eval()
    outs, ys = [], []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for images, labels in loader:
        with autocast:
            logits = model(
                images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            )
        outs.append(logits.float().cpu().numpy())
        ys.append(labels.numpy())
    return np.concatenate(outs), np.concatenate(ys)


def _validate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Accuracy and mean loss over the whole validation set, summed over the processes' shards."""
    correct, loss_sum, count = 0.0, 0.0, 0.0
    if len(loader.dataset):  # a shard is empty when there are more processes than images
        logits, ys = predict_logits(model, loader, device)
        correct, count = float((logits.argmax(1) == ys).sum()), float(len(ys))
        per_image = nn.functional.cross_entropy(
            torch.from_numpy(logits), torch.from_numpy(ys).long(), reduction="none"
        )
        loss_sum = float(per_image.double().sum())
    correct, loss_sum, count = distributed.all_sum([correct, loss_sum, count], device)
    return correct / count, loss_sum / count


def _param_groups(model: nn.Module, settings: FinetuneSettings) -> list[dict]:
    head = set(map(id, model.get_classifier().parameters()))
    body = [p for p in model.parameters() if id(p) not in head]
    return [
        {"params": body, "lr": settings.lr * settings.body_lr_factor},
        {"params": list(model.get_classifier().parameters()), "lr": settings.lr},
    ]


def _schedule(steps_per_epoch: int, epochs: int, warmup_epochs: int):
    warmup, total = steps_per_epoch * min(warmup_epochs, epochs - 1), steps_per_epoch * epochs

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor


def _train_epoch(
    model: nn.Module,
    loader: DataLoader,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    device: torch.device,
    desc: str,
    freeze_bn: bool,
    on_progress: ProgressCallback | None = None,
) -> tuple[float, int]:
    """One pass over this process's training images: summed loss and images seen."""
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    total, seen = 0.0, 0
    # Only rank 0 shows progress.
    bar = Progress(
        loader, desc=desc, unit="batch", disable=not distributed.is_main(), on_progress=on_progress
    )
    for images, labels in bar:
        loss = train_step(model, images, labels, opt, loss_fn, device, use_bf16)
        sched.step()
        total += loss.item() * len(labels)
        seen += len(labels)
        bar.set_postfix(loss=f"{total / seen:.3f}")
    return total, seen


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    opt: torch.optim.Optimizer,
    loss_fn: nn.Module,
    device: torch.device,
    use_bf16: bool,
) -> torch.Tensor:
    """One optimiser step on one batch, channels-last and (on capable GPUs) in bf16; its loss."""
    images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    labels = labels.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        loss = loss_fn(model(images), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def _save_atomically(state: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic, so a kill mid-write leaves the previous checkpoint intact


def finetune(
    model: nn.Module,
    train: tuple[Sequence[str], Sequence[int]],
    val: tuple[Sequence[str], Sequence[int]],
    prep: Preprocessing,
    settings: FinetuneSettings,
    checkpoint: Path,
    device: torch.device,
    seed: int,
    on_progress: ProgressCallback | None = None,
) -> FinetuneResult:
    """Train ``model`` in place; resume from ``checkpoint`` when a previous attempt left one.
    ``on_progress`` hears of every training step, as a fraction of all epochs'."""
    start = time.perf_counter()
    rank = distributed.rank()
    torch.manual_seed(seed + rank)  # processes differ in augmentation and dropout, not in weights
    model.to(device).to(memory_format=torch.channels_last)
    augment = train_transform(prep, flip=settings.flip)
    train_loader = _loader(ImageFiles(*train, augment), settings, True, device, seed)
    val_shard = ImageFiles(*map(distributed.shard, val), EvalTransform(prep))
    val_loader = _loader(val_shard, settings, False, device, seed)
    opt = torch.optim.AdamW(_param_groups(model, settings), weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _schedule(len(train_loader), settings.epochs, settings.warmup_epochs)
    )
    weight = (
        torch.tensor(settings.class_weights, dtype=torch.float32, device=device)
        if settings.class_weights
        else None
    )
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=settings.label_smoothing)
    history: list[dict[str, float]] = []
    best_acc, best_epoch, best_state = -1.0, -1, None
    first_epoch, resumed = 0, None
    # Rank 0 reads the checkpoint and hands every rank the same copy.
    saved = distributed.broadcast(
        torch.load(checkpoint, map_location="cpu", weights_only=True)
        if distributed.is_main() and checkpoint.is_file()
        else None
    )
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        history, best_acc, best_epoch = (
            list(saved["history"]),
            saved["best_acc"],
            saved["best_epoch"],
        )
        best_state = saved["best_state"]
        first_epoch = resumed = saved["epoch"] + 1
        rng = saved.get("rng_per_rank", [saved["rng"]])
        torch.set_rng_state(rng[rank % len(rng)])
        log.info(
            "resuming fine-tuning from checkpoint %s after epoch %d", checkpoint, saved["epoch"]
        )
    start_accuracy = None if saved is None else saved.get("start_accuracy")
    if (settings.measure_start or settings.keep_start) and resumed is None:
        start_accuracy = _validate(model, val_loader, device)[0]
        log.info("starting weights: val accuracy %.4f", start_accuracy)
        if settings.keep_start:
            best_acc, best_epoch = start_accuracy, -1
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    trainer = distributed.wrap(model, device)
    samples = 0
    raced = None
    for epoch in range(first_epoch, settings.epochs):
        if epoch - best_epoch > settings.patience and best_state is not None:
            log.info("early stop: no improvement for %d epochs", settings.patience)
            break
        log.info(
            "epoch %d/%d started: %d steps of %d images per process",
            epoch + 1,
            settings.epochs,
            len(train_loader),
            settings.batch_size,
        )
        distributed.set_epoch(train_loader, epoch)
        total, seen = _train_epoch(
            trainer,
            train_loader,
            opt,
            sched,
            loss_fn,
            device,
            f"epoch {epoch + 1}/{settings.epochs}",
            settings.freeze_bn,
            within(on_progress, epoch / settings.epochs, (epoch + 1) / settings.epochs),
        )
        samples += seen
        total, seen_everywhere = distributed.all_sum([total, seen], device)
        distributed.sync_buffers(model)
        val_acc, val_loss = _validate(model, val_loader, device)
        train_loss = total / max(seen_everywhere, 1)
        history.append({"train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_acc})
        log.info("epoch %d: train loss %.4f, val accuracy %.4f", epoch + 1, train_loss, val_acc)
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        rng = distributed.all_gather(torch.get_rng_state())
        if distributed.is_main():
            state = {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "history": history,
                "best_acc": best_acc,
                "best_epoch": best_epoch,
                "best_state": best_state,
                "start_accuracy": start_accuracy,
                "epoch": epoch,
                "rng": rng[0],
            }
            if len(rng) > 1:
                state["rng_per_rank"] = rng
            _save_atomically(state, checkpoint)
            log.info("checkpoint written after epoch %d: %s", epoch + 1, checkpoint)
        scores = [h["val_accuracy"] for h in history] + [best_acc]  # a kept start counts too
        verdict = settings.race.verdict(epoch, scores) if settings.race else None
        if verdict is not None:
            raced = f"{verdict} after epoch {epoch + 1}"
            log.info("race settled: clearly %s after epoch %d", verdict, epoch + 1)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    return FinetuneResult(
        best_acc,
        best_epoch,
        tuple(history),
        resumed,
        time.perf_counter() - start,
        tuple(distributed.all_gather(samples)),
        raced,
        start_accuracy,
    )
