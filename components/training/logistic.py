"""Multinomial logistic regression on cached features, fit as the convex problem it is.

A frozen backbone leaves one convex problem: softmax regression with an L2 penalty. Fitting it
with SGD and early stopping on the validation split (as a first version did) under-regularises
and makes validation optimistic; here the problem is solved to convergence by full-batch L-BFGS
and the penalty is chosen by stratified k-fold cross-validation on the training split alone, the
way scikit-learn's ``LogisticRegressionCV`` does, so the validation split stays an honest estimate.

Two exact shortcuts keep it as cheap as the embedding that feeds it:

- The penalised solution lies in the span of the training rows (representer theorem), so when a
  cut has more features than there are rows, the rows are rotated once onto that span (an SVD of
  the standardised matrix) and every fit runs in ``min(n, d)`` dimensions. Distances, hence the
  penalty and the predictions, are unchanged.
- The penalty path is walked from strong to weak with warm starts, so each fit starts next to its
  solution.

The penalty is written as sklearn's ``C`` (the sum of the losses weighed against half the squared
norm), so a grid means the same thing as in ``LogisticRegressionCV``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

log = logging.getLogger(__name__)

# sklearn's LogisticRegressionCV grid is logspace(-4, 4, 10); on standardised deep features the
# optimum sits in 1e-4..1e1, and weaker penalties only slow L-BFGS down.
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 1, 11))
MAX_ITER = 100
# Walking the path from strong to weak penalties, stop once accuracy has fallen this many grid
# steps in a row: weak penalties are the slow end of the path and past the peak they only overfit.
PATH_PATIENCE = 2


@dataclass(frozen=True)
class Standardiser:
    """Per-feature centre and scale from the training rows; near-constant features are damped.

    Dividing a near-constant feature by its tiny spread would fold huge weights into a grafted
    linear layer and amplify float noise (ONNX against PyTorch) into the logits, so every scale is
    at least 5% of the median scale.
    """

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardiser:
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        return cls(mean, np.maximum(std, 0.05 * float(np.median(std)) + 1e-6))

    def apply(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale).astype(np.float32)


@dataclass(frozen=True)
class LogisticFit:
    """A fitted softmax layer on raw features: ``logits = x @ weight.T + bias``."""

    weight: np.ndarray  # (classes, features)
    bias: np.ndarray  # (classes,)
    c: float
    cv_accuracy: float | None  # mean over folds at the chosen C; None when C was given
    cv_std: float | None
    folds: int

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.argmax(x @ self.weight.T + self.bias, axis=1)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(self.predict(x) == np.asarray(y)))


@dataclass(frozen=True)
class CvCurve:
    """Cross-validated accuracy (mean and spread over folds) at every penalty of a grid (C for
    logistic regression, alpha for ridge), in the order the grid was walked."""

    grid: tuple[float, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]
    folds: int

    @property
    def best(self) -> int:
        """Index of the best penalty; ties go to the one walked first (the stronger)."""
        return int(np.argmax(self.means))


def _solve(
    z: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    num_classes: int,
    c: float,
    start: torch.Tensor | None,
    max_iter: int,
) -> torch.Tensor:
    """Weights (problems, features + 1, classes), bias in the last row, for a batch of problems
    that share the rows ``z`` (problems, n, d) but weigh them by ``weights`` (problems, n): each
    minimises sklearn's objective divided by ``C * n_p``, i.e. its mean cross-entropy plus
    ``||W||^2 / (2 C n_p)``, the bias unpenalised. The folds of a cross-validation are one batch,
    so L-BFGS runs once for all of them instead of once per fold."""
    problems, _, d = z.shape
    counts = weights.sum(dim=1)  # (problems,)
    params = (
        start.clone()
        if start is not None
        else torch.zeros(problems, d + 1, num_classes, dtype=z.dtype)
    ).requires_grad_(True)
    l2 = 1.0 / (c * counts)
    targets = y.expand(problems, -1).reshape(-1)
    opt = torch.optim.LBFGS(
        [params],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-4,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = torch.baddbmm(params[:, -1:, :], z, params[:, :-1, :])
        losses = torch.nn.functional.cross_entropy(
            logits.reshape(-1, num_classes), targets, reduction="none"
        ).reshape(problems, -1)
        per_problem = (losses * weights).sum(dim=1) / counts
        penalty = 0.5 * l2 * params[:, :-1, :].pow(2).sum(dim=(1, 2))
        loss = (per_problem + penalty).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return params.detach()


def _span_basis(z: np.ndarray) -> np.ndarray | None:
    """Orthonormal basis (d, r) of the rows' span when it is smaller than d, else None."""
    n, d = z.shape
    if n >= d:
        return None
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    keep = s > s[0] * 1e-6
    return vt[keep].T.astype(np.float32)


def _as_tensors(z: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.require(z, np.float32, ["C", "W"])), torch.from_numpy(
        np.array(y, dtype=np.int64)
    )


def fold_count(labels: np.ndarray, folds: int, groups: np.ndarray | None = None) -> int:
    """At most ``folds``, at least 2, and never more than the rarest class has rows (or groups)."""
    if groups is None:
        smallest = int(np.bincount(np.unique(labels, return_inverse=True)[1]).min())
    else:
        pairs = np.unique(np.stack([np.asarray(labels).astype(str), np.asarray(groups)]), axis=1)
        smallest = int(np.unique(pairs[0], return_counts=True)[1].min())
    return int(max(2, min(folds, smallest)))


def fold_splits(
    y: np.ndarray, k: int, seed: int, groups: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded stratified k-fold (train rows, held-out rows); with ``groups`` (near-copies of one
    thing share a key) no group straddles a fold, or held-out rows would be scored on their own
    copies: on magnetic tiles that made 3-fold CV say 0.91 for a head that scored 0.55 on unseen
    tiles."""
    if groups is None:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(y)), y))
    grouped = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(grouped.split(np.zeros(len(y)), y, groups))


def balanced_row_weights(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-row weights that give every class the same total weight (mean weight 1)."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    present = counts > 0
    per_class = np.zeros(num_classes)
    per_class[present] = len(y) / (present.sum() * counts[present])
    return per_class[y]


def cv_curve(
    z: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    cs: Sequence[float],
    folds: int,
    seed: int,
    max_iter: int = MAX_ITER,
    balanced: bool = False,
    groups: np.ndarray | None = None,
) -> CvCurve:
    """Stratified k-fold accuracy of every C on standardised rows ``z`` (C ascending), all folds
    solved as one batch and the C path walked with warm starts. ``balanced`` weighs the classes
    alike in the loss and scores balanced accuracy (the mean recall) instead of accuracy."""
    k = fold_count(y, folds, groups)
    basis = _span_basis(z)
    zr, yt = _as_tensors(z @ basis if basis is not None else z, y)
    held_out = torch.zeros(k, len(y), dtype=torch.bool)
    for f, (_, test) in enumerate(fold_splits(y, k, seed, groups)):
        held_out[f, torch.from_numpy(test)] = True
    row = torch.ones(len(y), dtype=zr.dtype)
    if balanced:
        row = torch.from_numpy(balanced_row_weights(np.asarray(y), num_classes)).to(zr.dtype)
    train_weights = (~held_out).to(zr.dtype) * row
    batch = zr.expand(k, -1, -1)
    scores: list[np.ndarray] = []
    start = None
    for c in cs:
        start = _solve(batch, yt, train_weights, num_classes, c, start, max_iter)
        with torch.no_grad():
            pred = torch.baddbmm(start[:, -1:, :], batch, start[:, :-1, :]).argmax(dim=2)
            hit = ((pred == yt) & held_out).to(torch.float64)
            if balanced:  # mean recall over the classes present in each held-out fold
                onehot = torch.nn.functional.one_hot(yt, num_classes).to(torch.float64)
                per_class = (hit @ onehot) / (held_out.to(torch.float64) @ onehot).clamp_min(1)
                present = (held_out.to(torch.float64) @ onehot) > 0
                scores.append(((per_class * present).sum(1) / present.sum(1)).numpy())
            else:
                scores.append((hit.sum(dim=1) / held_out.sum(dim=1)).numpy())
        means = [float(s.mean()) for s in scores]
        if len(means) > PATH_PATIENCE and all(
            means[-i] < means[-i - 1] for i in range(1, PATH_PATIENCE + 1)
        ):
            break
    return _curve(cs[: len(scores)], np.stack(scores, axis=1), k)


def _curve(cs: Sequence[float], scores: np.ndarray, k: int) -> CvCurve:
    """The curve from a (folds, grid) matrix of held-out accuracies."""
    return CvCurve(
        tuple(float(c) for c in cs),
        tuple(float(m) for m in scores.mean(axis=0)),
        tuple(float(s) for s in scores.std(axis=0)),
        k,
    )


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    seed: int,
    cs: Sequence[float] = DEFAULT_CS,
    folds: int = 5,
    max_iter: int = MAX_ITER,
    balanced: bool = False,
    groups: np.ndarray | None = None,
) -> tuple[LogisticFit, CvCurve | None]:
    """Standardise, choose C by k-fold CV on these rows (skipped when ``cs`` has one value),
    refit on all of them, and fold the standardisation back into the layer. ``balanced`` weighs
    every class alike (imbalanced data); ``groups`` keeps near-copies in one fold."""
    y = np.asarray(y)
    scaler = Standardiser.fit(x)
    z = scaler.apply(x)
    curve = (
        cv_curve(z, y, num_classes, cs, folds, seed, max_iter, balanced, groups)
        if len(cs) > 1
        else None
    )
    c = curve.grid[curve.best] if curve is not None else cs[0]
    basis = _span_basis(z)
    zt, yt = _as_tensors(z @ basis if basis is not None else z, y)
    row = balanced_row_weights(y, num_classes) if balanced else np.ones(len(y))
    weights = torch.from_numpy(row).to(zt.dtype)[None]
    solved = _solve(zt[None], yt, weights, num_classes, c, None, max_iter)[0].numpy()
    w_std = solved[:-1] if basis is None else basis @ solved[:-1]  # (d, classes)
    weight = (w_std / scaler.scale[:, None]).T
    bias = solved[-1] - weight @ scaler.mean
    fit = LogisticFit(
        weight.astype(np.float32),
        bias.astype(np.float32),
        float(c),
        None if curve is None else curve.means[curve.best],
        None if curve is None else curve.stds[curve.best],
        0 if curve is None else curve.folds,
    )
    log.info("logistic fit: C %.3g (cv accuracy %s)", c, fit.cv_accuracy)
    return fit, curve
