"""Resolution by measurement: the better-scoring size, the cheaper one on a tie, the budget."""

from __future__ import annotations

import numpy as np

from components.common.plan import ProbeScores
from components.decision.resolution import candidate_sizes, choose_by_budget, choose_by_probe
from components.decision.strategy import probe_cuts


def _probe(mean: float, std: float = 0.02) -> ProbeScores:
    return ProbeScores(("block5", "head"), (mean - 0.1, mean), (std, std), "head", 3)


def test_candidates_are_the_rule_and_native_sizes() -> None:
    assert candidate_sizes(64, 224) == (64, 224)
    assert candidate_sizes(224, 224) == (224,)


def test_native_wins_when_it_scores_clearly_better() -> None:
    choice = choose_by_probe({64: _probe(0.59), 224: _probe(0.68)}, {64: 1.0, 224: 9.0}, 200)
    assert choice.chosen == 224 and choice.method == "probe"
    assert "0.680" in choice.reason and "200 training images" in choice.reason
    assert [c.size for c in choice.candidates] == [64, 224]


def test_cheaper_size_wins_a_tie_within_noise() -> None:
    choice = choose_by_probe({64: _probe(0.975), 224: _probe(0.98)}, {64: 1.0, 224: 9.0}, 200)
    assert choice.chosen == 64 and "within noise" in choice.reason


def test_budget_takes_the_largest_size_that_fits() -> None:
    assert choose_by_budget({64: 300.0, 224: 4000.0}, 1800).chosen == 64
    assert choose_by_budget({64: 30.0, 224: 400.0}, 1800).chosen == 224
    none_fit = choose_by_budget({64: 3000.0, 224: 40000.0}, 1800)
    assert none_fit.chosen == 64 and "no size fits" in none_fit.reason


def test_the_size_whose_features_carry_the_classes_wins() -> None:
    """Feature level, not images: when the small size's features carry no class signal and the
    large size's do, the probe the pipeline runs scores them apart and the large size is chosen."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 60)
    detail = np.hstack([np.eye(2)[y] * 3 + rng.normal(size=(120, 2)), rng.normal(size=(120, 6))])
    blurred = rng.normal(size=(120, 8))  # the detail averaged away
    small = probe_cuts({"head": blurred}, y, seed=0)
    large = probe_cuts({"head": detail}, y, seed=0)
    choice = choose_by_probe({64: small, 224: large}, {64: 0.5, 224: 4.0}, 120)
    assert choice.chosen == 224
