"""Turning a validated manifest into per-split arrays: paths, integer labels, cached features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from components.engine.extraction import ExtractionEngine
from components.engine.images import Preprocessing


@dataclass(frozen=True)
class SplitData:
    """Paths, integer labels and cached features (per cut point) of one split; ``groups`` keys
    near-copies of one thing alike (None: every image stands alone), so that a split of these
    rows (cross-validation folds, the nested split) keeps each group on one side."""

    paths: list[str]
    labels: np.ndarray
    features: dict[str, np.ndarray]
    groups: np.ndarray | None = None

    def subset(self, rows: np.ndarray) -> SplitData:
        """The rows ``rows`` (in that order)."""
        return SplitData(
            [self.paths[i] for i in rows],
            self.labels[rows],
            {cut: x[rows] for cut, x in self.features.items()},
            None if self.groups is None else self.groups[rows],
        )


def load_splits(
    manifest: pd.DataFrame,
    classes: list[str],
    engine: ExtractionEngine,
    prep: Preprocessing,
) -> dict[str, SplitData]:
    """One ``SplitData`` per split present; features come from the engine's cache (computed if
    missing)."""
    index = {c: i for i, c in enumerate(classes)}
    group = manifest.get("group", pd.Series(dtype=str)).astype(str).replace({"": None, "nan": None})
    grouped = bool(group.notna().any())
    out = {}
    for split in ("train", "val", "test"):
        rows = manifest[manifest["split"] == split]
        if rows.empty:
            continue
        paths = rows["path"].tolist()
        features = engine.features(paths, rows["sha256"].tolist(), prep)
        groups = group[rows.index].fillna(rows["relpath"]).to_numpy(str) if grouped else None
        out[split] = SplitData(paths, rows["label"].map(index).to_numpy(), features, groups)
    return out
