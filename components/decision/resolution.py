"""Choosing the input resolution by measurement rather than by a rule of thumb.

For the frozen cases the features are computed once, so resolution is a one-time cost: the
candidates (the backbone's native size and the cheaper size the rule suggests for small images) are
each scored by the same cross-validated linear probe on one stratified sample of the training
split, and the best is taken, the cheaper one on a tie within noise. A 32-px photo set scored 9
points higher at 224 px than at the rule's 64 px; a 28-px digit set scores the same at both, so it
keeps the cheap one.

For the fine-tuned cases every epoch pays for the resolution again, so the choice is by cost: the
largest candidate whose estimated fine-tune (measured training throughput x images x epochs) fits
the budget, else the cheapest.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from components.common.plan import ProbeScores
from components.common.progress import ProgressCallback, within
from components.decision.strategy import probe_cuts
from components.engine.extraction import ExtractionEngine
from components.engine.images import Preprocessing


@dataclass(frozen=True)
class ResolutionCandidate:
    """One input size and what was measured at it."""

    size: int
    probe_accuracy: float | None  # best cut's CV accuracy on the sample (frozen cases)
    probe_std: float | None
    seconds: float | None  # embedding the sample (frozen) or the estimated fine-tune (fine-tuned)


@dataclass(frozen=True)
class ResolutionChoice:
    """The size used, every candidate's numbers, and why."""

    chosen: int
    method: str  # "probe" | "budget" | "config" | "only candidate"
    candidates: tuple[ResolutionCandidate, ...]
    reason: str
    sample_images: int = 0
    budget_seconds: float | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def candidate_sizes(rule_size: int, native: int) -> tuple[int, ...]:
    """The rule's size and the native one, cheapest first (one value when they coincide)."""
    return tuple(sorted({rule_size, native}))


def choose_by_probe(
    probes: Mapping[int, ProbeScores], seconds: Mapping[int, float], sample_images: int
) -> ResolutionChoice:
    """The best-scoring size; a cheaper size within one standard error of the best wins the tie."""
    sizes = sorted(probes)
    best_of = {s: int(np.argmax(probes[s].means)) for s in sizes}
    accuracy = {s: probes[s].means[best_of[s]] for s in sizes}
    std = {s: probes[s].stds[best_of[s]] for s in sizes}
    top = max(sizes, key=lambda s: (accuracy[s], -s))
    bar = accuracy[top] - std[top] / math.sqrt(max(probes[top].folds, 1))
    chosen = next(s for s in sizes if accuracy[s] >= bar)
    candidates = tuple(
        ResolutionCandidate(s, accuracy[s], std[s], round(seconds.get(s, float("nan")), 2))
        for s in sizes
    )
    scores = ", ".join(f"{s} px {accuracy[s]:.3f}" for s in sizes)
    if chosen == top:
        why = f"it scored best ({scores})"
    else:
        why = f"it is within noise of the best {top} px and cheaper ({scores})"
    reason = (
        f"{chosen} px: a linear probe on {sample_images} training images at each candidate size "
        f"chose it because {why}."
    )
    return ResolutionChoice(chosen, "probe", candidates, reason, sample_images)


def measure_sizes(
    paths: Sequence[str],
    sha256s: Sequence[str],
    labels: np.ndarray,
    sizes: Sequence[int],
    prep: Preprocessing,
    engine: ExtractionEngine,
    seed: int,
    prefer: str = "earliest",
    on_progress: ProgressCallback | None = None,
) -> ResolutionChoice:
    """Embed one sample at every candidate size through the feature cache, probe each with the
    same cross-validated linear probe the case choice uses, and choose (``choose_by_probe``).
    ``on_progress`` hears of the embedding, each size an equal share."""
    probes, seconds = {}, {}
    for i, size in enumerate(sizes):
        start = time.perf_counter()
        features = engine.features(
            list(paths),
            list(sha256s),
            replace(prep, image_size=size),
            on_progress=within(on_progress, i / len(sizes), (i + 1) / len(sizes)),
        )
        seconds[size] = time.perf_counter() - start
        probes[size] = probe_cuts(features, labels, seed, prefer)
    return choose_by_probe(probes, seconds, len(paths))


def choose_by_budget(
    estimated_seconds: Mapping[int, float], budget_seconds: float
) -> ResolutionChoice:
    """The largest size whose estimated fine-tune fits the budget, else the cheapest."""
    sizes = sorted(estimated_seconds)
    fitting = [s for s in sizes if estimated_seconds[s] <= budget_seconds]
    chosen = fitting[-1] if fitting else sizes[0]
    costs = ", ".join(f"{s} px ~{estimated_seconds[s]:.0f} s" for s in sizes)
    if fitting:
        why = f"the largest size whose estimated fine-tune fits the {budget_seconds:.0f} s budget"
    else:
        why = f"the cheapest: no size fits the {budget_seconds:.0f} s budget"
    candidates = tuple(
        ResolutionCandidate(s, None, None, round(estimated_seconds[s], 1)) for s in sizes
    )
    return ResolutionChoice(
        chosen,
        "budget",
        candidates,
        f"{chosen} px, {why} ({costs}).",
        budget_seconds=budget_seconds,
    )


def fixed_choice(size: int, reason: str, method: str) -> ResolutionChoice:
    """A size nobody measured against another (set in configuration, or the only candidate)."""
    return ResolutionChoice(size, method, (ResolutionCandidate(size, None, None, None),), reason)
