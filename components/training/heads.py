"""A new linear classifier on cached features (the frozen cases 1 and 2), as an ``nn.Linear``.

The fit itself is ``training.logistic``: L2-penalised softmax regression solved to convergence,
its penalty chosen by k-fold cross-validation on the training rows only. The validation rows are
scored once, after the choice, so the validation accuracy is an honest estimate rather than the
maximum over a sweep. The standardisation is folded into the layer, so the grafted model takes
raw backbone features and needs no extra module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from components.training.logistic import DEFAULT_CS, CvCurve, fit_logistic


@dataclass(frozen=True)
class HeadFit:
    """The fitted layer, the penalty chosen and the cross-validation behind it."""

    head: nn.Linear
    c: float
    cv_accuracy: float | None
    cv_folds: int
    val_accuracy: float
    curve: CvCurve | None


def fit_linear_head(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    num_classes: int,
    seed: int,
    folds: int = 5,
    cs: tuple[float, ...] = DEFAULT_CS,
    balanced: bool = False,
    groups: np.ndarray | None = None,
) -> HeadFit:
    """Fit the softmax layer on the training rows, then score it once on the validation rows;
    ``balanced`` weighs the classes alike (imbalanced data), ``groups`` keeps near-copies of one
    thing in one fold when C is chosen."""
    fit, curve = fit_logistic(
        x_train, np.asarray(y_train), num_classes, seed, cs, folds, balanced=balanced, groups=groups
    )
    layer = nn.Linear(x_train.shape[1], num_classes)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(fit.weight))
        layer.bias.copy_(torch.from_numpy(fit.bias))
    val_accuracy = fit.accuracy(x_val, y_val) if len(y_val) else float("nan")
    return HeadFit(layer, fit.c, fit.cv_accuracy, fit.folds, val_accuracy, curve)
