from dataclasses import replace

import numpy as np
import pytest

from components.common.config import StrategyConfig
from components.common.fingerprint import RunRecord
from components.common.plan import ProbeScores
from components.data.changes import DataChange, PreviousRun
from components.data.counting import DatasetCounts
from components.data.splits import SplitData
from components.decision.costs import case_seconds, finetune_seconds
from components.decision.reporting import decision_markdown
from components.decision.strategy import plan_for_case, select_case
from components.decision.verification import (
    RUNNER_UP,
    VerificationResult,
    decide_verification,
    difference_se,
    nested_split,
    reuse_sentence,
    reused_verdict,
    settle,
)
from components.similarity.scores import SimilarityReport


def _plan(case: int = 1, **strategy):
    counts = DatasetCounts(
        100, {"train": 100}, {"a": {"train": 50}, "b": {"train": 50}}, ("a", "b"), 50, 200
    )
    similarity = SimilarityReport(0.9, 0.88, 0.92, 0.2, ("bn",), (0.2,), 0.3, 0.7, 32, 1.5)
    cfg = StrategyConfig(case=case, **strategy) if case != 1 else StrategyConfig(**strategy)
    return select_case(counts, similarity, cfg, None if case != 2 else _probe())


def _probe() -> ProbeScores:
    return ProbeScores(("block0", "head"), (0.6, 0.9), (0.01, 0.01), "head")


def test_runner_up_flips_frozen_and_fine_tuned_keeping_similarity() -> None:
    assert RUNNER_UP == {1: 3, 3: 1, 2: 4, 4: 2}


def test_auto_verifies_whenever_the_committed_cost_fits_a_budget_that_scales_with_the_work() -> (
    None
):
    far = replace(_plan(), min_images_per_class=50)  # 20x below the threshold: still measured
    fast = decide_verification(far, StrategyConfig(), 500, 8, lambda: 200.0, 100)
    assert fast.run and fast.runner_up == 3 and "fits" in fast.reason
    # committed: the frozen case plus the fine-tune up to its first comparison (3 of 8 epochs)
    inner = 500 - round(500 * 0.2)
    assert fast.estimated_seconds == pytest.approx(
        case_seconds(1, inner, 100, 3, 200.0) + finetune_seconds(inner, 100, 3, 200.0), abs=0.1
    )
    assert fast.worst_seconds > fast.estimated_seconds
    # the budget is half the full fine-tune it could unlock, floored at 120 s
    full = finetune_seconds(500, 100, 8, 200.0)
    assert fast.budget_seconds == pytest.approx(max(120.0, 0.5 * full), abs=0.1)
    slow = decide_verification(far, StrategyConfig(), 500, 8, lambda: 0.05, 100)
    assert slow.budget_seconds == StrategyConfig().verify_budget_max_s  # capped
    assert not slow.run and "exceeds" in slow.reason
    # a bigger check unlocks a bigger budget: 20x the images, same rate
    big = decide_verification(far, StrategyConfig(), 10_000, 8, lambda: 20.0, 2000)
    small = decide_verification(far, StrategyConfig(), 500, 8, lambda: 20.0, 100)
    assert big.budget_seconds > small.budget_seconds


def test_the_worst_case_counts_case_4s_random_initialisation_fallback() -> None:
    """Only the worst case: the fallback runs only after a pre-trained fine-tune the race did not
    stop, so the committed cost (what the budget is checked against) is the same as case 3's."""
    similar = replace(_plan(), min_images_per_class=50)
    different = replace(similar, case=2, similarity="different", cut="block3")
    three = decide_verification(similar, StrategyConfig(), 500, 8, lambda: 200.0, 100)
    four = decide_verification(different, StrategyConfig(), 500, 8, lambda: 200.0, 100)
    assert (three.runner_up, four.runner_up) == (3, 4)
    assert four.estimated_seconds == pytest.approx(three.estimated_seconds)
    inner = 500 - round(500 * 0.2)
    fine_tune = finetune_seconds(inner, 100, 8, 200.0)
    assert four.worst_seconds - three.worst_seconds == pytest.approx(fine_tune, abs=0.2)
    assert "falls back to random weights" in four.reason
    assert "falls back" not in three.reason


def test_off_on_and_user_overrides() -> None:
    plan = _plan()
    assert not decide_verification(plan, StrategyConfig(verify="off"), 500, 8, lambda: 1e6).run
    assert decide_verification(plan, StrategyConfig(verify="on"), 500, 8, lambda: 0.1).run
    forced = _plan(case=3)
    skipped = decide_verification(forced, StrategyConfig(verify="on"), 500, 8, lambda: 1e6)
    assert not skipped.run and "set by configuration" in skipped.reason


def test_nested_split_is_stratified_disjoint_and_seeded() -> None:
    labels = np.repeat(np.arange(3), [20, 30, 50])
    data = SplitData([f"{i}.png" for i in range(100)], labels, {"head": np.eye(100)})
    inner_train, inner_val = nested_split(data, 0.2, seed=0)
    again_train, _ = nested_split(data, 0.2, seed=0)
    assert len(inner_val.labels) == 20 and len(inner_train.labels) == 80
    assert not set(inner_train.paths) & set(inner_val.paths)
    assert np.bincount(inner_val.labels).tolist() == [4, 6, 10]
    assert inner_train.paths == again_train.paths
    # features travel with their images
    rows = [int(p.split(".")[0]) for p in inner_val.paths]
    assert (inner_val.features["head"].argmax(1) == rows).all()


def test_plan_for_case_keeps_the_evidence_and_picks_the_probe_cut() -> None:
    plan = _plan()
    other = plan_for_case(plan, 2, _probe(), None, "Because.")
    assert other.case == 2 and other.cut == "head" and other.reason.endswith("Because.")
    assert other.similarity_score == plan.similarity_score
    assert plan_for_case(plan, 2, None, 3).cut == "block3"
    assert plan_for_case(plan, 3, None, None).cut is None


def test_the_switching_margin_shrinks_with_the_held_out_set() -> None:
    assert difference_se(0.97, 0.98, 1400) == pytest.approx(0.0058, abs=1e-4)
    assert difference_se(0.94, 0.94, 49) > 0.04
    assert difference_se(1.0, 1.0, 10) == 0.0


def test_a_lead_beyond_the_margin_decides_and_a_tie_goes_by_the_data() -> None:
    similar = replace(_plan(), similarity="similar")  # rule case 1, runner-up 3
    different = replace(_plan(), case=2, similarity="different")  # runner-up 4
    large_different = replace(different, case=4)  # runner-up 2
    cfg = StrategyConfig()
    n = 279  # eurosat_rgb's nested check: 0.943 frozen against 0.950 fine-tuned, margin 0.019
    assert settle(different, 4, {2: 0.943, 4: 0.950}, n, cfg) == (4, 0.0191, True)
    assert settle(different, 4, {2: 0.950, 4: 0.943}, n, cfg)[0] == 2  # the fine-tune trails
    assert settle(similar, 3, {1: 0.943, 3: 0.950}, n, cfg)[0] == 1  # similar data: the rule
    assert settle(large_different, 2, {2: 0.950, 4: 0.943}, n, cfg)[0] == 4  # the rule's fine-tune
    assert settle(large_different, 2, {2: 0.943, 4: 0.950}, n, cfg)[0] == 4
    assert settle(different, 4, {2: 0.943, 4: 0.950}, n, StrategyConfig(verify_ties="rule")) == (
        2, 0.0191, True
    )  # fmt: skip
    # beyond the margin the scores decide, whatever the data
    se = round(difference_se(0.90, 0.95, n), 4)
    assert settle(similar, 3, {1: 0.90, 3: 0.95}, n, cfg) == (3, se, False)
    assert settle(different, 4, {2: 0.95, 4: 0.90}, n, cfg) == (2, se, False)
    assert settle(large_different, 2, {2: 0.95, 4: 0.90}, n, cfg)[0] == 2
    # the margin is one standard error of the difference, so more held-out images settle more
    assert settle(different, 4, {2: 0.943, 4: 0.950}, 40 * n, cfg)[2] is False


def _previous(verdict: dict | None, share: float, same_config: bool = True) -> PreviousRun:
    record = RunRecord("f", "d", "run-1", "m", 1, "models:/m/1", "/r", "now", verification=verdict)
    changed = round(share * 1000)
    return PreviousRun(record, DataChange(1000, 1000 + changed, changed, 0, 0), same_config)


def test_a_measured_verdict_is_reused_while_little_changed_since_it() -> None:
    plan = _plan()  # rule case 1
    measured = {"run": True, "rule_case": 1, "runner_up": 3, "chosen_case": 3,
                "inner_accuracy": {"1": 0.8, "3": 0.9}, "margin": 0.03}  # fmt: skip
    reused = reused_verdict(_previous(measured, 0.05), plan, StrategyConfig())
    assert reused is not None and reused["chosen_case"] == 3
    assert reused["reused_from"] == "run-1" and reused["changed_since"] == 0.05
    assert "run-1" in reuse_sentence(reused) and "case 3 0.900" in reuse_sentence(reused)
    # a reused verdict carries its measurement's run and the change summed since it
    again = reused_verdict(_previous(reused, 0.04), plan, StrategyConfig())
    assert again is not None and again["reused_from"] == "run-1"
    assert again["changed_since"] == pytest.approx(0.09)
    assert reused_verdict(_previous(again, 0.04), plan, StrategyConfig()) is None  # 13% > 10%

    def refused(previous: PreviousRun | None, plan=plan, **strategy) -> bool:
        return reused_verdict(previous, plan, StrategyConfig(**strategy)) is None

    assert refused(None)
    assert refused(_previous(measured, 0.2))
    assert refused(_previous(measured, 0.05, same_config=False))
    assert refused(_previous(measured, 0.05), verify="on")  # "on" measures every run
    assert refused(_previous(measured, 0.05), verify_reuse_max_change=0)
    assert refused(_previous({**measured, "rule_case": 3}, 0.05))  # the rule moved
    assert refused(
        _previous({"run": False, "rule_case": 1, "reason": "off"}, 0.0)
    )  # never measured
    assert refused(_previous(measured, 0.0), plan=_plan(case=3))  # case set by configuration
    # the rule's case kept: reused when the runner-up was clearly behind, not when it was a tie
    kept = {**measured, "chosen_case": 1, "inner_accuracy": {"1": 0.9, "3": 0.85}}
    assert not refused(_previous(kept, 0.05))
    assert refused(_previous({**kept, "inner_accuracy": {"1": 0.9, "3": 0.88}}, 0.05))
    # verdicts that record the tie: a tie settled either way is measured again
    assert refused(_previous({**measured, "tie": True}, 0.05))
    assert not refused(
        _previous({**kept, "inner_accuracy": {"1": 0.9, "3": 0.88}, "tie": False}, 0.05)
    )
    assert refused(_previous({**kept, "inner_accuracy": {"1": 0.9, "3": 0.92}}, 0.05))


def test_the_report_shows_a_tie_each_cases_size_and_the_frozen_measurement() -> None:
    plan = replace(_plan(), case=4, similarity="different")
    result = VerificationResult(
        decide_verification(
            replace(plan, case=2), StrategyConfig(verify="on"), 1394, 8, lambda: 10.0
        ),
        {2: 0.943, 4: 0.950},
        {2: 23.7, 4: 1623.0},
        4,
        0.0191,
        1115,
        279,
        tie=True,
        image_size={2: 224, 4: 128},
    )
    resolution = {
        "chosen": 128,
        "candidates": [{"size": 128, "probe_accuracy": None, "probe_std": None, "seconds": 900}],
        "reason": "Fine-tuned at 128 px, the largest size whose fine-tune fits the budget.",
        "frozen": {"reason": "224 px: a linear probe chose it because it scored best."},
    }
    final = replace(plan, verification=result.to_dict(), resolution=resolution)
    similarity = SimilarityReport(0.2, 0.1, 0.3, 0.2, ("bn",), (0.2,), 0.3, 0.7, 32, 1.5)
    counts = DatasetCounts(
        100, {"train": 100}, {"a": {"train": 50}, "b": {"train": 50}}, ("a", "b"), 50, 200
    )
    report = decision_markdown(counts, similarity, final)
    assert "a tie: settled by strategy.verify_ties" in report
    assert "| 4 (kept) | 128 | 0.950 [" in report and "| 2 | 224 | 0.943 [" in report
    assert "for frozen features (the rule's case): 224 px" in report
    sentence = result.sentence()
    assert "case 2 at 224 px scored 0.943" in sentence and "case 4 at 128 px 0.950" in sentence
    assert "a tie within 0.019" in sentence and "settled for case 4" in sentence


def test_nested_split_keeps_each_group_of_copies_on_one_side() -> None:
    labels = np.repeat(np.arange(2), 60)
    groups = np.array([f"g{i // 3}" for i in range(120)])  # 40 groups of three copies
    data = SplitData([f"{i}.png" for i in range(120)], labels, {"head": np.eye(120)}, groups)
    inner_train, inner_val = nested_split(data, 0.2, seed=0)
    assert not set(inner_train.groups) & set(inner_val.groups)
    assert 18 <= len(inner_val.labels) <= 30 and set(inner_val.labels) == {0, 1}
    assert nested_split(data, 0.2, seed=0)[1].paths == inner_val.paths
    rows = [int(p.split(".")[0]) for p in inner_val.paths]
    assert (inner_val.features["head"].argmax(1) == rows).all()
    assert inner_val.groups.tolist() == groups[rows].tolist()
