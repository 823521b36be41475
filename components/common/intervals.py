"""Confidence intervals for accuracies, so no figure is reported without its n and its noise.

Wilson's score interval is used rather than the normal approximation: it stays inside [0, 1] and
keeps its coverage at the small n and extreme accuracies this pipeline meets (30 validation images
at 0.97, say), where ``p +/- 1.96 * se`` collapses to a point or leaves the unit interval.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

Z_95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for ``correct`` successes out of ``n`` (``(0, 1)`` when n is 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Clamped to contain p itself: at p = 0 or 1 rounding could leave it a hair outside.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


@dataclass(frozen=True)
class Accuracy:
    """An accuracy with its count and 95% Wilson interval."""

    value: float
    n: int
    low: float
    high: float

    @classmethod
    def of(cls, correct: int, n: int) -> Accuracy:
        low, high = wilson_interval(correct, n)
        return cls(correct / n if n else 0.0, n, low, high)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.3f} (95% CI {self.low:.3f}-{self.high:.3f}, n={self.n})"
