"""Turning a validated manifest into per-split arrays: paths, integer labels, cached features."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from components.backbones import Backbone
from components.features import extract_features
from components.images import Preprocessing
from components.training import SplitData


def load_splits(
    manifest: pd.DataFrame,
    classes: list[str],
    backbone: Backbone,
    prep: Preprocessing,
    cache_dir: Path,
    num_workers: int = 2,
    engine: str = "auto",
) -> dict[str, SplitData]:
    """One ``SplitData`` per split present; features come from the cache (computed if missing)."""
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split in ("train", "val", "test"):
        rows = manifest[manifest["split"] == split]
        if rows.empty:
            continue
        paths = rows["path"].tolist()
        features = extract_features(
            backbone,
            paths,
            rows["sha256"].tolist(),
            prep,
            cache_dir,
            num_workers=num_workers,
            engine=engine,
        )
        out[split] = SplitData(paths, rows["label"].map(index).to_numpy(), features)
    return out
