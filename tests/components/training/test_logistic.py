"""The convex head: the same answer as scikit-learn's solver, penalty chosen by CV, exact shortcuts."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from components.training.logistic import (
    Standardiser,
    cv_curve,
    fit_logistic,
    fold_count,
    fold_splits,
)


def _blobs(n_per_class: int, dims: int, classes: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dims)) * 2.0
    x = np.concatenate([c + spread * rng.normal(size=(n_per_class, dims)) for c in centres])
    y = np.repeat(np.arange(classes), n_per_class)
    return x.astype(np.float32), y


@pytest.mark.parametrize("dims", [8, 300])  # fewer rows than features takes the span shortcut
def test_matches_sklearn_at_the_same_penalty(dims: int) -> None:
    x, y = _blobs(40, dims, 3, spread=3.0, seed=1)
    z = Standardiser.fit(x).apply(x)
    fit, curve = fit_logistic(z, y, 3, seed=0, cs=(0.05,))
    assert curve is None and fit.c == 0.05
    reference = LogisticRegression(C=0.05, max_iter=5000, tol=1e-10).fit(z, y)
    # z is already standardised, so the folded layer is (nearly) the solver's own weights.
    np.testing.assert_allclose(fit.weight, reference.coef_, atol=2e-3)
    centred = fit.bias - fit.bias.mean()
    np.testing.assert_allclose(
        centred, reference.intercept_ - reference.intercept_.mean(), atol=2e-3
    )
    np.testing.assert_array_equal(fit.predict(z), reference.predict(z))


def test_penalty_chosen_by_cross_validation_is_not_the_weakest_on_noisy_data() -> None:
    # Many noisy features, few rows: an unpenalised fit memorises, CV must pick a real penalty.
    x, y = _blobs(30, 400, 2, spread=12.0, seed=2)
    cs = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
    curve = cv_curve(Standardiser.fit(x).apply(x), y, 2, cs, folds=5, seed=0)
    assert curve.folds == 5 and len(curve.means) == len(cs)
    assert curve.best < len(cs) - 1
    assert max(curve.means) > 0.6


def test_deterministic_for_a_seed_and_folds_capped_by_the_rarest_class() -> None:
    x, y = _blobs(20, 16, 3, spread=2.0, seed=3)
    y = y.copy()
    y[:17] = 1  # class 0 keeps only 3 rows
    first, c1 = fit_logistic(x, y, 3, seed=7)
    second, c2 = fit_logistic(x, y, 3, seed=7)
    assert c1 is not None and c2 is not None and c1.folds == 3
    assert c1.means == c2.means and first.c == second.c
    np.testing.assert_array_equal(first.weight, second.weight)


def test_folded_layer_takes_raw_features() -> None:
    x, y = _blobs(50, 12, 4, spread=1.0, seed=4)
    x = x * 100 + 5000  # far from standardised: a missing unfold would show
    fit, _ = fit_logistic(x, y, 4, seed=0)
    assert fit.accuracy(x, y) > 0.95


def test_balanced_weights_lift_the_minority_class() -> None:
    # 300 rows of class 0, 15 of class 1, overlapping: unweighted, the minority is mostly lost.
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(0, 1, (300, 4)), rng.normal(1.2, 1, (15, 4))]).astype(np.float32)
    y = np.array([0] * 300 + [1] * 15)
    plain, _ = fit_logistic(x, y, 2, seed=0, cs=(1.0,))
    balanced, _ = fit_logistic(x, y, 2, seed=0, cs=(1.0,), balanced=True)
    minority = y == 1
    assert np.mean(balanced.predict(x[minority]) == 1) > np.mean(plain.predict(x[minority]) == 1)
    assert np.mean(balanced.predict(x[minority]) == 1) >= 0.6


def _copies_with_no_signal(groups: int, copies: int, dims: int, seed: int):
    """``groups`` random points, each repeated ``copies`` times with a little noise, labelled at
    random per group: a held-out copy of a training row is easy, an unseen group is a coin toss."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, dims))
    x = np.repeat(centres, copies, axis=0) + 0.05 * rng.normal(size=(groups * copies, dims))
    labels = rng.permutation(np.arange(groups) % 2)
    return x.astype(np.float32), np.repeat(labels, copies), np.repeat(np.arange(groups), copies)


def test_folds_keep_copies_together_so_cv_scores_unseen_things() -> None:
    x, y, groups = _copies_with_no_signal(60, 4, 200, seed=3)
    for train, test in fold_splits(y, 3, seed=0, groups=groups):
        assert not set(groups[train]) & set(groups[test])
    assert [t.tolist() for _, t in fold_splits(y, 3, 0, groups)] == [
        t.tolist() for _, t in fold_splits(y, 3, 0, groups)
    ]
    assert fold_count(y, 5, groups) == 5 and fold_count(y[:8], 5, groups[:8]) == 2
    z = Standardiser.fit(x).apply(x)
    cs = (0.01, 1.0)
    leaky = cv_curve(z, y, 2, cs, folds=3, seed=0)
    honest = cv_curve(z, y, 2, cs, folds=3, seed=0, groups=groups)
    assert leaky.means[leaky.best] > 0.9  # held-out copies of training rows
    assert honest.means[honest.best] < 0.7  # no signal across groups
