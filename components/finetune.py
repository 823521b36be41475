"""Fine-tuning the whole network (cases 3 and 4), checkpointed every epoch so a retry resumes.

The recipe is the careful one: a head fitted first on frozen features, AdamW with a lower learning
rate for the pre-trained body, one warm-up epoch then cosine decay, label smoothing, early stopping
with the best weights restored; mixed precision and channels-last on CUDA.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from components.features import ImageFiles
from components.images import Preprocessing, eval_transform, train_transform

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneSettings:
    """What one fine-tuning run needs beyond the model and the data."""

    epochs: int
    lr: float
    body_lr_factor: float  # pre-trained layers learn this much slower than the new head
    weight_decay: float
    label_smoothing: float
    batch_size: int
    num_workers: int
    patience: int = 3
    flip: bool = True  # horizontal flips suit photos, not digits or text


@dataclass(frozen=True)
class FinetuneResult:
    val_accuracy: float
    best_epoch: int
    history: tuple[dict[str, float], ...]
    resumed_from_epoch: int | None
    seconds: float


def _loader(
    paths: Sequence[str],
    labels: Sequence[int],
    transform: nn.Module,
    settings: FinetuneSettings,
    shuffle: bool,
    device: torch.device,
    seed: int,
) -> DataLoader:
    return DataLoader(
        ImageFiles(paths, labels, transform),
        batch_size=settings.batch_size,
        shuffle=shuffle,
        num_workers=settings.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=settings.num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
        drop_last=shuffle and len(paths) > settings.batch_size,
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


def _param_groups(model: nn.Module, settings: FinetuneSettings) -> list[dict]:
    head = set(map(id, model.get_classifier().parameters()))
    body = [p for p in model.parameters() if id(p) not in head]
    return [
        {"params": body, "lr": settings.lr * settings.body_lr_factor},
        {"params": list(model.get_classifier().parameters()), "lr": settings.lr},
    ]


def _schedule(steps_per_epoch: int, epochs: int):
    warmup, total = steps_per_epoch, steps_per_epoch * epochs

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor


def finetune(
    model: nn.Module,
    train: tuple[Sequence[str], Sequence[int]],
    val: tuple[Sequence[str], Sequence[int]],
    prep: Preprocessing,
    settings: FinetuneSettings,
    checkpoint: Path,
    device: torch.device,
    seed: int,
) -> FinetuneResult:
    """Train ``model`` in place; resume from ``checkpoint`` when a previous attempt left one."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model.to(device).to(memory_format=torch.channels_last)
    augment = train_transform(prep, flip=settings.flip)
    train_loader = _loader(*train, augment, settings, True, device, seed)
    val_loader = _loader(*val, eval_transform(prep), settings, False, device, seed)
    opt = torch.optim.AdamW(_param_groups(model, settings), weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(len(train_loader), settings.epochs))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    history: list[dict[str, float]] = []
    best_acc, best_epoch, best_state = -1.0, -1, None
    first_epoch, resumed = 0, None
    if checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=device, weights_only=True)
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
        torch.set_rng_state(saved["rng"])
        log.info(
            "resuming fine-tuning from checkpoint %s after epoch %d", checkpoint, saved["epoch"]
        )
    for epoch in range(first_epoch, settings.epochs):
        if epoch - best_epoch > settings.patience and best_epoch >= 0:
            log.info("early stop: no improvement for %d epochs", settings.patience)
            break
        model.train()
        total, seen = 0.0, 0
        bar = tqdm(
            train_loader, desc=f"epoch {epoch + 1}/{settings.epochs}", unit="batch", leave=False
        )
        for images, labels in bar:
            images = images.to(device, non_blocking=True).contiguous(
                memory_format=torch.channels_last
            )
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = loss_fn(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(labels)
            seen += len(labels)
            bar.set_postfix(loss=f"{total / seen:.3f}")
        logits, ys = predict_logits(model, val_loader, device)
        val_acc = float((logits.argmax(1) == ys).mean())
        val_loss = float(
            nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(ys).long())
        )
        history.append(
            {"train_loss": total / max(seen, 1), "val_loss": val_loss, "val_accuracy": val_acc}
        )
        log.info(
            "epoch %d: train loss %.4f, val accuracy %.4f", epoch + 1, total / max(seen, 1), val_acc
        )
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "history": history,
                "best_acc": best_acc,
                "best_epoch": best_epoch,
                "best_state": best_state,
                "epoch": epoch,
                "rng": torch.get_rng_state(),
            },
            tmp,
        )
        tmp.replace(checkpoint)  # atomic, so a kill mid-write leaves the previous checkpoint intact
    if best_state is not None:
        model.load_state_dict(best_state)
    model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    return FinetuneResult(
        best_acc, best_epoch, tuple(history), resumed, time.perf_counter() - start
    )
