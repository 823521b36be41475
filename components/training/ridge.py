"""A closed-form probe: ridge regression on one-hot targets, every penalty from one decomposition.

Ranking cuts and resolutions needs a classifier per candidate and per fold, many times over; the
logistic head (``training.logistic``) is iterative, so doing it for every candidate would cost
more than the embedding that feeds it. A least-squares classifier answers the same question, "how
linearly separable are the classes in these features", in closed form: per fold one symmetric
eigendecomposition of the training Gram matrix gives the solution at every penalty by rescaling,

    W(alpha) = V diag(1 / (s + alpha)) V^T Z^T Y,

so a whole grid costs about what one fit costs. When there are fewer rows than features the rows
are first rotated onto their span (as in the logistic fit), so the decomposition is ``min(n, d)``
square. ``docs/decisions.md`` compares its ranking of cuts with the logistic probe's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from components.training.logistic import CvCurve, fold_count, fold_splits

# Penalties relative to the mean eigenvalue of the Gram matrix (scale-free across cuts).
DEFAULT_ALPHAS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def ridge_cv_curve(
    z: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    folds: int,
    seed: int,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    groups: np.ndarray | None = None,
) -> CvCurve:
    """Stratified k-fold accuracy of a ridge classifier at every relative penalty ``alphas``
    (``groups``: near-copies kept in one fold)."""
    k = fold_count(y, folds, groups)
    x = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float64))
    if x.shape[0] < x.shape[1]:  # rotate onto the rows' span: the same fits in fewer dimensions
        _, s, vt = torch.linalg.svd(x, full_matrices=False)
        x = x @ vt[s > s[0] * 1e-8].T
    targets = torch.nn.functional.one_hot(torch.from_numpy(np.asarray(y)), num_classes).double()
    scores = np.zeros((k, len(alphas)))
    for f, (train, test) in enumerate(fold_splits(y, k, seed, groups)):
        xt, xv = x[train], x[test]
        mean = xt.mean(dim=0)
        xt, xv = xt - mean, xv - mean
        yt = targets[train]
        y_mean = yt.mean(dim=0)
        evals, evecs = torch.linalg.eigh(xt.T @ xt)
        evals = evals.clamp_min(0)
        projected = evecs.T @ (xt.T @ (yt - y_mean))
        held = xv @ evecs
        scale = float(evals.mean())
        truth = torch.from_numpy(np.asarray(y)[test])
        for j, alpha in enumerate(alphas):
            w = projected / (evals + alpha * scale)[:, None]
            pred = (held @ w + y_mean).argmax(dim=1)
            scores[f, j] = float((pred == truth).double().mean())
    return CvCurve(
        tuple(float(a) for a in alphas),
        tuple(float(m) for m in scores.mean(axis=0)),
        tuple(float(s) for s in scores.std(axis=0)),
        k,
    )
