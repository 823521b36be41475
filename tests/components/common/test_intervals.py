"""Wilson intervals: known values, and sane at the edges where the normal approximation fails."""

from __future__ import annotations

import pytest

from components.common.intervals import Accuracy, wilson_interval


def test_known_value() -> None:
    # 8 of 10: the textbook Wilson 95% interval is 0.490-0.943.
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)


@pytest.mark.parametrize(("correct", "n"), [(0, 30), (30, 30), (1, 2), (500, 1000)])
def test_inside_unit_interval_and_contains_the_estimate(correct: int, n: int) -> None:
    low, high = wilson_interval(correct, n)
    assert 0.0 <= low <= correct / n <= high <= 1.0
    assert high - low > 0  # never a point, even at 30 of 30


def test_narrows_with_n() -> None:
    small, large = Accuracy.of(27, 30), Accuracy.of(2700, 3000)
    assert (large.high - large.low) < (small.high - small.low) / 5
    assert "n=30" in str(small)
