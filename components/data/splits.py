"""Turning a validated manifest into per-split arrays: paths, integer labels, cached features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from components.engine.extraction import ExtractionEngine
from components.engine.images import Preprocessing


@dataclass(frozen=True)
class SplitData:
    """Paths, integer labels and cached features (per cut point) of one split."""

    paths: list[str]
    labels: np.ndarray
    features: dict[str, np.ndarray]


def load_splits(
    manifest: pd.DataFrame,
    classes: list[str],
    engine: ExtractionEngine,
    prep: Preprocessing,
) -> dict[str, SplitData]:
    """One ``SplitData`` per split present; features come from the engine's cache (computed if
    missing)."""
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split in ("train", "val", "test"):
        rows = manifest[manifest["split"] == split]
        if rows.empty:
            continue
        paths = rows["path"].tolist()
        features = engine.features(paths, rows["sha256"].tolist(), prep)
        out[split] = SplitData(paths, rows["label"].map(index).to_numpy(), features)
    return out
