"""A content-addressed store of per-image rows (features, BatchNorm moments).

Rows are keyed by the image's sha256 under a folder named for the backbone, its weights and the
preprocessing, so renaming or moving files costs nothing, a rerun on the same data computes
nothing, and two weights files or two resolutions never mix.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from components.engine.backbones import Backbone
from components.engine.images import Preprocessing

MOMENTS_SUFFIX = "-bn-moments"


def cache_key(backbone: Backbone, prep: Preprocessing) -> str:
    """The folder name of ``backbone``'s feature rows at ``prep``."""
    blob = json.dumps(
        {"backbone": backbone.name, "weights": backbone.weights_sha256, "prep": prep.to_dict()},
        sort_keys=True,
    )
    return f"{backbone.name.replace(':', '_')}-{prep.image_size}px-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


class RowCache:
    """Append-only rows keyed by image sha256 (one chunk file per extraction)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._index: dict[str, np.ndarray] = {}
        for chunk in sorted(folder.glob("chunk-*.npz")):
            with np.load(chunk) as data:
                for sha, row in zip(data["sha256"], data["features"], strict=True):
                    self._index[str(sha)] = row

    def missing(self, shas: Sequence[str]) -> list[str]:
        """``shas`` (each once, in order) that have no row yet."""
        return [s for s in dict.fromkeys(shas) if s not in self._index]

    def add(self, shas: Sequence[str], rows: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"chunk-{uuid.uuid4().hex}.npz"
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, sha256=np.asarray(shas), features=rows)
        tmp.rename(path)  # atomic: a killed run never leaves a half-written chunk behind
        self._index.update(zip(shas, rows, strict=True))

    def get(self, shas: Sequence[str]) -> np.ndarray:
        return np.stack([self._index[s] for s in shas]).astype(np.float32)
