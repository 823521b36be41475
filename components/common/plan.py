"""The decision's result: which case to train, where to cut, and every number behind it.

It lives below every stage because training, tracking and the reports all read it, while the
decision stage, which writes it, also trains (its verification).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

CASE_NAMES = {
    1: "small, similar: frozen backbone, new last layer",
    2: "small, different: early layers kept and frozen, new classifier",
    3: "large, similar: new last layer, whole network fine-tuned from pre-trained weights",
    4: "large, different: fine-tune from pre-trained weights, random initialisation as fallback",
}


@dataclass(frozen=True)
class ProbeScores:
    """Cross-validated accuracy of a linear probe on pooled features at each cut point."""

    cuts: tuple[str, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]
    chosen: str
    folds: int = 3
    penalties: tuple[float, ...] = ()  # the penalty CV chose at each cut


@dataclass(frozen=True)
class TransferPlan:
    """The decision and every number behind it."""

    case: int
    cut: str | None  # case 2 only: the last layer kept
    size: str  # "small" | "large"
    similarity: str  # "similar" | "different"
    uncertain: bool  # the similarity interval straddles the threshold
    reason: str
    overridden: bool
    min_images_per_class: int
    large_images_per_class: int
    similarity_score: float
    similar_threshold: float
    probe: ProbeScores | None = None
    verification: dict[str, object] | None = None  # budgeted check against the runner-up, if run
    resolution: dict[str, object] | None = None  # the input sizes measured and the one chosen

    def to_dict(self) -> dict[str, object]:
        return asdict(self)
