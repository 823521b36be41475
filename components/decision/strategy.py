"""Choosing the transfer case (size x similarity) and, for case 2, where to cut the network.

The rule is the classic one; what this module adds is that every judgement is a measured number
compared with a documented, overridable threshold, and the reason is written down as a sentence.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
from sklearn.model_selection import train_test_split

from components.common.config import StrategyConfig
from components.common.errors import ConfigError
from components.common.plan import CASE_NAMES, ProbeScores, TransferPlan
from components.data.counting import DatasetCounts
from components.similarity.scores import SimilarityReport
from components.training.logistic import Standardiser, fold_count
from components.training.ridge import ridge_cv_curve

log = logging.getLogger(__name__)


def probe_cuts(
    features: dict[str, np.ndarray],
    labels: np.ndarray,
    seed: int,
    prefer: str = "earliest",
    folds: int = 3,
    max_rows: int = 4000,
    groups: np.ndarray | None = None,
) -> ProbeScores:
    """Score a linear head at every cut by k-fold CV on the training rows and pick one.

    The probe is a closed-form ridge classifier (``training.ridge``: every penalty of its grid from
    one decomposition per fold, the best kept per cut), so scoring every cut costs less than
    embedding the images did; the final head is then the logistic fit at the chosen cut. ``prefer`` breaks ties within noise (one standard error
    of the best): ``"earliest"`` (different data: earlier cuts are smaller, faster and less
    specific to the source task) or ``"head"`` (similar data: the whole network, the rule's prior).
    Large sets are subsampled (stratified; whole groups when ``groups`` marks near-copies, which
    the folds then keep together): ranking cuts does not need every image.
    """
    if len(labels) > max_rows:
        keep = _subsample(labels, max_rows, seed, groups)
        features, labels = {c: x[keep] for c, x in features.items()}, labels[keep]
        groups = None if groups is None else groups[keep]
    y = np.unique(labels, return_inverse=True)[1]
    num_classes = int(y.max()) + 1
    cuts, means, stds, cs = [], [], [], []
    folds_used = fold_count(y, folds, groups)
    for cut, x in features.items():
        z = Standardiser.fit(x).apply(x)
        curve = ridge_cv_curve(z, y, num_classes, folds, seed, groups=groups)
        cuts.append(cut)
        means.append(curve.means[curve.best])
        stds.append(curve.stds[curve.best])
        cs.append(curve.grid[curve.best])
    best = int(np.argmax(means))
    bar = means[best] - stds[best] / np.sqrt(folds_used)
    if prefer == "head" and "head" in cuts and means[cuts.index("head")] >= bar:
        chosen = "head"
    else:
        chosen = next(c for c, m in zip(cuts, means, strict=True) if m >= bar)
    log.info(
        "probe accuracies %s -> cut after %s",
        {c: round(m, 3) for c, m in zip(cuts, means, strict=True)},
        chosen,
    )
    return ProbeScores(tuple(cuts), tuple(means), tuple(stds), chosen, folds_used, tuple(cs))


def _subsample(labels: np.ndarray, rows: int, seed: int, groups: np.ndarray | None) -> np.ndarray:
    """About ``rows`` row indices (sorted): stratified, or whole groups in a seeded order."""
    if groups is None:
        keep, _ = train_test_split(
            np.arange(len(labels)), train_size=rows, stratify=labels, random_state=seed
        )
        return np.sort(keep)
    keys, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(keys))
    taken = order[: int(np.searchsorted(np.cumsum(sizes[order]), rows)) + 1]
    return np.flatnonzero(np.isin(inverse, taken))


def planned_case(counts: DatasetCounts, similarity: SimilarityReport, cfg: StrategyConfig) -> int:
    """The case that will be trained (the rule's, or the override), before any probing."""
    if cfg.case != "auto":
        return int(cfg.case)
    large = counts.min_train_per_class >= cfg.large_images_per_class
    similar = similarity.score >= cfg.similar_threshold
    return {(False, True): 1, (False, False): 2, (True, True): 3, (True, False): 4}[
        (large, similar)
    ]


def needs_probe(counts: DatasetCounts, similarity: SimilarityReport, cfg: StrategyConfig) -> bool:
    """A frozen case whose cut is not set: the probe measures it (case 1 is the cut at the head)."""
    return (
        planned_case(counts, similarity, cfg) in (1, 2) and cfg.cut_block is None and cfg.case != 1
    )


def probe_preference(similarity: SimilarityReport, cfg: StrategyConfig) -> str:
    """Which cut a tie goes to: the head for similar data (the rule's prior), else the earliest."""
    return (
        "head" if similarity.score >= cfg.similar_threshold and cfg.case == "auto" else "earliest"
    )


def select_case(
    counts: DatasetCounts,
    similarity: SimilarityReport,
    cfg: StrategyConfig,
    probe: ProbeScores | None = None,
) -> TransferPlan:
    """Apply the size x similarity rule (or the user's override) and say why."""
    size = "large" if counts.min_train_per_class >= cfg.large_images_per_class else "small"
    similar = similarity.score >= cfg.similar_threshold
    verdict = "similar" if similar else "different"
    uncertain = similarity.low < cfg.similar_threshold <= similarity.high
    rule_case = {("small", True): 1, ("small", False): 2, ("large", True): 3, ("large", False): 4}[
        (size, similar)
    ]
    overridden = cfg.case != "auto"
    case = rule_case if not overridden else int(cfg.case)
    reason = (
        f"{size}: the smallest class has {counts.min_train_per_class} training images "
        f"({'>=' if size == 'large' else '<'} {cfg.large_images_per_class} per class); "
        f"{verdict}: similarity {similarity.score:.2f} (90% interval {similarity.low:.2f}-"
        f"{similarity.high:.2f}) is {'>=' if similar else '<'} the threshold {cfg.similar_threshold:.2f}"
        f"{', an uncertain call' if uncertain else ''}; so case {rule_case} ({CASE_NAMES[rule_case]})."
    )
    if overridden:
        reason += f" Overridden by configuration: case {case} ({CASE_NAMES[case]})."
    cut = None
    if case in (1, 2) and not overridden and cfg.cut_block is None and probe is not None:
        case, cut = (1, None) if probe.chosen == "head" else (2, probe.chosen)
        reason += " " + probe_sentence(probe, rule_case, case)
    elif case == 2:
        if cfg.cut_block is not None:
            cut = f"block{cfg.cut_block}"
            reason += f" Cut after {cut} (set in configuration)."
        elif probe is not None:
            cut = probe.chosen if probe.chosen != "head" else probe.cuts[-2]
            reason += " " + probe_sentence(probe, rule_case, case)
        else:
            raise ConfigError("case 2 needs strategy.cut_block or probe scores to choose the cut")
    return TransferPlan(
        case=case,
        cut=cut,
        size=size,
        similarity=verdict,
        uncertain=uncertain,
        reason=reason,
        overridden=overridden,
        min_images_per_class=counts.min_train_per_class,
        large_images_per_class=cfg.large_images_per_class,
        similarity_score=similarity.score,
        similar_threshold=cfg.similar_threshold,
        probe=probe,
    )


def probe_sentence(probe: ProbeScores, rule_case: int, case: int) -> str:
    """One sentence on what the probe measured and what it changed."""
    best = probe.cuts[int(np.argmax(probe.means))]
    at = probe.means[probe.cuts.index(probe.chosen)]
    tie = "the head" if rule_case == 1 else "the earliest cut"
    where = "the head (the whole network)" if probe.chosen == "head" else f"{probe.chosen}"
    text = (
        f"A linear head scored {at:.3f} at {where} in {probe.folds}-fold cross-validation on the "
        f"training split (best {max(probe.means):.3f} at {best}; within noise of the best, "
        f"{tie} wins)."
    )
    if case != rule_case:
        text += f" The measurement moves the frozen case from {rule_case} to {case}."
    return text


def plan_for_case(
    plan: TransferPlan, case: int, probe: ProbeScores | None, cut_block: int | None, why: str = ""
) -> TransferPlan:
    """The same evidence with another case trained (verification, benchmarks); ``why`` is appended."""
    cut = None
    if case == 2:
        if cut_block is not None:
            cut = f"block{cut_block}"
        elif probe is not None:
            cut = probe.chosen
        else:
            raise ConfigError("case 2 needs strategy.cut_block or probe scores to choose the cut")
    return replace(
        plan, case=case, cut=cut, probe=probe or plan.probe, reason=f"{plan.reason} {why}".strip()
    )
