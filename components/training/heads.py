"""Fitting a new linear classifier on cached features (the frozen cases 1 and 2).

Features are standardised for a well-conditioned fit, then the scaling is folded back into the
linear layer so the grafted model takes raw backbone features and needs no extra module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadFit:
    """The fitted layer and its learning curve (per epoch)."""

    head: nn.Linear
    weight_decay: float
    best_epoch: int
    val_accuracy: float
    history: tuple[dict[str, float], ...]


def _fit_once(
    x: torch.Tensor,
    y: torch.Tensor,
    xv: torch.Tensor,
    yv: torch.Tensor,
    num_classes: int,
    epochs: int,
    lr: float,
    weight_decay: float,
    label_smoothing: float,
    seed: int,
) -> tuple[nn.Linear, int, float, list[dict[str, float]]]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    # Small sets take 256-row steps; large ones at most 16 steps an epoch, so that 40,000 cached
    # rows fit in seconds rather than minutes (the problem is convex; bigger steps lose nothing).
    batch = max(256, len(x) // 16)
    best = (-1.0, float("inf"), 0, layer.state_dict())
    history: list[dict[str, float]] = []
    patience, since_best = max(10, epochs // 5), 0
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            opt.zero_grad()
            loss = loss_fn(layer(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        with torch.no_grad():
            logits = layer(xv)
            val_loss = float(nn.functional.cross_entropy(logits, yv))
            val_acc = float((logits.argmax(1) == yv).float().mean())
        history.append(
            {"train_loss": total / len(x), "val_loss": val_loss, "val_accuracy": val_acc}
        )
        if (val_acc, -val_loss) > (best[0], -best[1]):
            best = (val_acc, val_loss, epoch, {k: v.clone() for k, v in layer.state_dict().items()})
            since_best = 0
        else:
            since_best += 1
            if since_best >= patience:
                break
    layer.load_state_dict(best[3])
    return layer, best[2], best[0], history


def fit_linear_head(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    num_classes: int,
    epochs: int,
    lr: float,
    label_smoothing: float,
    seed: int,
    weight_decays: tuple[float, ...] = (1e-4, 1e-2, 1e-1),
) -> HeadFit:
    """Fit a softmax classifier, choosing weight decay on validation accuracy (then loss)."""
    mu = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    # Near-constant features carry no signal; dividing by their tiny spread would fold huge
    # weights into the grafted layer and amplify float noise (ONNX vs PyTorch) into the logits.
    sd = np.maximum(std, 0.05 * float(np.median(std)) + 1e-6)
    x = torch.from_numpy((x_train - mu) / sd).float()
    xv = torch.from_numpy((x_val - mu) / sd).float()
    y, yv = torch.as_tensor(np.array(y_train)).long(), torch.as_tensor(np.array(y_val)).long()
    fits = []
    for wd in weight_decays:
        layer, epoch, acc, history = _fit_once(
            x, y, xv, yv, num_classes, epochs, lr, wd, label_smoothing, seed
        )
        with torch.no_grad():
            loss = float(nn.functional.cross_entropy(layer(xv), yv))
        fits.append((acc, -loss, wd, layer, epoch, history))
        log.info("head fit: weight decay %g -> val accuracy %.4f (epoch %d)", wd, acc, epoch)
    acc, _, wd, layer, epoch, history = max(fits, key=lambda f: (f[0], f[1]))
    folded = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        scale = torch.from_numpy(1.0 / sd).float()
        folded.weight.copy_(layer.weight * scale)
        folded.bias.copy_(layer.bias - (layer.weight * scale) @ torch.from_numpy(mu).float())
    return HeadFit(folded, wd, epoch, acc, tuple(history))
