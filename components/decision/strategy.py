"""Choosing the transfer case (size x similarity) and, for case 2, where to cut the network.

The rule is the classic one; what this module adds is that every judgement is a measured number
compared with a documented, overridable threshold, and the reason is written down as a sentence.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from components.common.config import StrategyConfig
from components.common.errors import ConfigError
from components.common.plan import CASE_NAMES, ProbeScores, TransferPlan
from components.data.counting import DatasetCounts
from components.similarity.scores import SimilarityReport

log = logging.getLogger(__name__)


def probe_cuts(
    features: dict[str, np.ndarray],
    labels: np.ndarray,
    seed: int,
    folds: int = 3,
    max_rows: int = 4000,
) -> ProbeScores:
    """Pick case 2's cut: the earliest cut whose probe accuracy is within noise of the best.

    Earlier cuts mean a smaller, faster model and features that are less specific to the source
    task, so a tie goes to the earlier one ("within noise" = one standard error of the best).
    The probe ranks cuts; it need not see every image, so large sets are subsampled (stratified).
    """
    if len(labels) > max_rows:
        keep, _ = train_test_split(
            np.arange(len(labels)), train_size=max_rows, stratify=labels, random_state=seed
        )
        keep = np.sort(keep)
        features, labels = {c: x[keep] for c, x in features.items()}, labels[keep]
    counts = np.bincount(np.unique(labels, return_inverse=True)[1])
    k = int(max(2, min(folds, counts.min())))
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    cuts, means, stds = [], [], []
    for cut, x in features.items():
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=0.5))
        scores = cross_val_score(probe, x, labels, cv=splitter)
        cuts.append(cut)
        means.append(float(scores.mean()))
        stds.append(float(scores.std()))
    best = int(np.argmax(means))
    bar = means[best] - stds[best] / np.sqrt(k)
    chosen = next(c for c, m in zip(cuts, means, strict=True) if m >= bar)
    log.info(
        "probe accuracies %s -> cut after %s",
        {c: round(m, 3) for c, m in zip(cuts, means, strict=True)},
        chosen,
    )
    return ProbeScores(tuple(cuts), tuple(means), tuple(stds), chosen)


def planned_case(counts: DatasetCounts, similarity: SimilarityReport, cfg: StrategyConfig) -> int:
    """The case that will be trained (the rule's, or the override), before any probing."""
    if cfg.case != "auto":
        return int(cfg.case)
    large = counts.min_train_per_class >= cfg.large_images_per_class
    similar = similarity.score >= cfg.similar_threshold
    return {(False, True): 1, (False, False): 2, (True, True): 3, (True, False): 4}[
        (large, similar)
    ]


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
    if case == 2:
        if cfg.cut_block is not None:
            cut = f"block{cfg.cut_block}"
            reason += f" Cut after {cut} (set in configuration)."
        elif probe is not None:
            cut = probe.chosen
            best = probe.cuts[int(np.argmax(probe.means))]
            reason += (
                f" Cut after {cut}: a linear probe scored {probe.means[probe.cuts.index(cut)]:.3f} there "
                f"(best {max(probe.means):.3f} at {best}; the earliest cut within noise wins)."
            )
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
