"""The statistics behind the promotion gate: two models scored on the same images.

Accuracies on a few hundred images move by several points between equally good models, so the gate
never calls a difference a win on its own: paired outcomes go through the exact McNemar test (only
the images the two models disagree on carry information about which is better), and every accuracy
is reported with its Wilson 95% interval (sound near 0 and 1 and for small n, unlike p ± 2 se).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs.

    ``only_first``: images the first model gets right and the second wrong; ``only_second`` the
    reverse. Under "equally good" each discordant image is a fair coin, so this is a binomial test
    of ``only_first`` out of their sum at 1/2 (p = 1 when the models never disagree).
    """
    discordant = only_first + only_second
    if discordant == 0:
        return 1.0
    return float(binomtest(only_first, discordant, 0.5, alternative="two-sided").pvalue)


@dataclass(frozen=True)
class PairedComparison:
    """Challenger against champion on the same n images."""

    n: int
    challenger_correct: int
    champion_correct: int
    challenger_only: int  # right where the champion is wrong
    champion_only: int  # right where the challenger is wrong
    p_value: float

    @property
    def challenger_accuracy(self) -> float:
        return self.challenger_correct / self.n if self.n else 0.0

    @property
    def champion_accuracy(self) -> float:
        return self.champion_correct / self.n if self.n else 0.0


def compare_paired(challenger_right: np.ndarray, champion_right: np.ndarray) -> PairedComparison:
    """Counts and McNemar p-value from two boolean arrays over the same images."""
    a = np.asarray(challenger_right, dtype=bool)
    b = np.asarray(champion_right, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes must have one shape, got {a.shape} and {b.shape}")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    return PairedComparison(
        n=int(a.size),
        challenger_correct=int(a.sum()),
        champion_correct=int(b.sum()),
        challenger_only=only_a,
        champion_only=only_b,
        p_value=mcnemar_exact(only_a, only_b),
    )


def accuracy_floor(min_accuracy: float, num_classes: int) -> float:
    """The accuracy any champion must reach: the configured floor, never below chance + 0.1."""
    chance = 1.0 / max(num_classes, 1)
    return min(1.0, max(min_accuracy, chance + 0.1))
