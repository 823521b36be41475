from dataclasses import replace

import numpy as np
import pytest

from components.common.config import StrategyConfig
from components.common.errors import ConfigError
from components.data.counting import DatasetCounts
from components.decision.reporting import decision_markdown
from components.decision.strategy import planned_case, probe_cuts, select_case
from components.similarity.scores import SimilarityReport


def _counts(per_class: int) -> DatasetCounts:
    return DatasetCounts(
        total=2 * per_class,
        per_split={"train": 2 * per_class},
        per_class={"a": {"train": per_class}, "b": {"train": per_class}},
        classes=("a", "b"),
        min_train_per_class=per_class,
        median_short_side=200,
    )


def _similarity(score: float, spread: float = 0.02) -> SimilarityReport:
    return SimilarityReport(
        score=score,
        low=score - spread,
        high=score + spread,
        mean_kl=1.0,
        layer_names=("bn",),
        layer_kl=(1.0,),
        source_entropy=0.5,
        source_max_prob=0.5,
        n_images=10,
        kl_scale=1.5,
    )


@pytest.mark.parametrize(
    ("per_class", "score", "case"),
    [(50, 0.9, 1), (50, 0.1, 2), (5000, 0.9, 3), (5000, 0.1, 4)],
)
def test_size_by_similarity_rule(per_class: int, score: float, case: int) -> None:
    cfg = StrategyConfig(cut_block=3)
    plan = select_case(_counts(per_class), _similarity(score), cfg)
    assert plan.case == case == planned_case(_counts(per_class), _similarity(score), cfg)
    assert str(per_class) in plan.reason and f"{score:.2f}" in plan.reason
    assert plan.cut == ("block3" if case == 2 else None)


def test_thresholds_are_configurable() -> None:
    plan = select_case(
        _counts(50),
        _similarity(0.6),
        StrategyConfig(large_images_per_class=40, similar_threshold=0.7),
    )
    assert plan.case == 4 and plan.size == "large" and plan.similarity == "different"


def test_override_is_recorded() -> None:
    plan = select_case(_counts(50), _similarity(0.9), StrategyConfig(case=3))
    assert plan.case == 3 and plan.overridden and "Overridden" in plan.reason


def test_uncertain_when_interval_straddles_threshold() -> None:
    assert select_case(_counts(50), _similarity(0.52, 0.1), StrategyConfig()).uncertain
    assert not select_case(_counts(50), _similarity(0.9, 0.1), StrategyConfig()).uncertain


def test_case_2_needs_a_cut() -> None:
    with pytest.raises(ConfigError, match="cut"):
        select_case(_counts(50), _similarity(0.1), StrategyConfig())


def test_probe_prefers_the_earliest_cut_within_noise() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 60)
    signal = np.eye(3)[y] * 3
    feats = {
        "block0": rng.normal(size=(180, 8)),  # noise only
        "block1": np.hstack([signal, rng.normal(size=(180, 5))]),  # separable
        "block2": np.hstack([signal, rng.normal(size=(180, 13))]),  # equally separable, later
    }
    probe = probe_cuts(feats, y, seed=0)
    assert probe.means[0] < 0.6 and probe.means[1] > 0.95
    assert probe.chosen == "block1"
    plan = select_case(_counts(50), _similarity(0.1), StrategyConfig(), probe)
    assert plan.cut == "block1" and "cross-validation" in plan.reason


def _two_cut_features(head_signal: float, block_signal: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1, 2], 60)
    onehot = np.eye(3)[y]
    feats = {
        "block5": np.hstack(
            [onehot * block_signal + rng.normal(size=(180, 3)), rng.normal(size=(180, 10))]
        ),
        "head": np.hstack(
            [onehot * head_signal + rng.normal(size=(180, 3)), rng.normal(size=(180, 10))]
        ),
    }
    return feats, y


def test_similar_data_keeps_the_head_on_a_tie() -> None:
    feats, y = _two_cut_features(head_signal=3.0, block_signal=3.0)
    probe = probe_cuts(feats, y, seed=0, prefer="head")
    assert probe.chosen == "head"
    plan = select_case(_counts(50), _similarity(0.9), StrategyConfig(), probe)
    assert plan.case == 1 and plan.cut is None


def test_similar_data_moves_to_an_earlier_cut_that_clearly_wins() -> None:
    # The head's features carry little class signal, block5's a lot: measured, not assumed.
    feats, y = _two_cut_features(head_signal=0.3, block_signal=3.0)
    probe = probe_cuts(feats, y, seed=0, prefer="head")
    assert probe.means[probe.cuts.index("block5")] > probe.means[probe.cuts.index("head")] + 0.2
    plan = select_case(_counts(50), _similarity(0.9), StrategyConfig(), probe)
    assert (plan.case, plan.cut) == (2, "block5")
    assert "moves the frozen case from 1 to 2" in plan.reason


def test_probe_is_deterministic_for_a_seed() -> None:
    feats, y = _two_cut_features(head_signal=1.0, block_signal=1.2, seed=3)
    first = probe_cuts(feats, y, seed=5)
    again = probe_cuts(feats, y, seed=5)
    assert first == again


def test_probe_with_groups_scores_unseen_groups_and_subsamples_whole_ones() -> None:
    # block5 separates the classes; "head" only tells groups apart (labels random per group),
    # which copies of a training group in a held-out fold would reward.
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(60), 4)
    y = np.repeat(rng.permutation(np.arange(60) % 2), 4)
    feats = {
        "block5": np.eye(2)[y] * 2 + rng.normal(size=(240, 2)),
        "head": np.repeat(rng.normal(size=(60, 150)), 4, axis=0)
        + 0.05 * rng.normal(size=(240, 150)),
    }
    leaky = probe_cuts(feats, y, seed=0, prefer="head")
    honest = probe_cuts(feats, y, seed=0, prefer="head", groups=groups)
    head = leaky.cuts.index("head")
    assert leaky.means[head] > 0.9 and leaky.chosen == "head"
    assert honest.means[head] < 0.7 and honest.chosen == "block5"
    small = probe_cuts(feats, y, seed=0, max_rows=100, groups=groups)
    assert small.folds == 3 and small.chosen == "block5"


@pytest.mark.parametrize(("case", "chooses"), [(1, "cross-validation"), (4, "the epoch kept")])
def test_the_report_says_which_images_the_final_model_learns_from(case: int, chooses: str) -> None:
    counts = replace(_counts(50), total=130, per_split={"train": 100, "val": 16, "test": 14})
    plan = select_case(counts, _similarity(0.9), StrategyConfig(case=case))
    report = decision_markdown(counts, _similarity(0.9), plan)
    line = next(x for x in report.splitlines() if "Final fit" in x)
    assert "training split only (100 images)" in line and chooses in line
    assert "validation split (16)" in line and "test split (14)" in line
