"""A content-addressed store of per-image rows (features, BatchNorm moments).

Rows are keyed by the image's sha256 under a folder named for the backbone, its weights and the
preprocessing, so renaming or moving files costs nothing, a rerun on the same data computes
nothing, and two weights files or two resolutions never mix.
"""

from __future__ import annotations

import hashlib
import json
import os
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
    """Append-only rows keyed by image sha256 (one chunk file per extraction).

    Several processes may add to one folder at once: each writes its own chunk files, and a
    ``refresh`` reads what the others wrote.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._index: dict[str, np.ndarray] = {}
        self._read: set[str] = set()
        self.refresh()

    def refresh(self) -> int:
        """Read the chunks written since this cache was opened (by other processes, such as the
        shards of a Dask run); returns how many rows that added."""
        before = len(self._index)
        for chunk in sorted(self.folder.glob("chunk-*.npz")):
            if chunk.name in self._read or chunk.name.endswith(".tmp.npz"):
                continue  # a temporary file is some writer's chunk still being written
            with np.load(chunk) as data:
                for sha, row in zip(data["sha256"], data["features"], strict=True):
                    self._index[str(sha)] = row
            self._read.add(chunk.name)
        return len(self._index) - before

    def shas(self) -> list[str]:
        """Every image with a row, in the order the rows were read or added."""
        return list(self._index)

    def missing(self, shas: Sequence[str]) -> list[str]:
        """``shas`` (each once, in order) that have no row yet."""
        return [s for s in dict.fromkeys(shas) if s not in self._index]

    def add(self, shas: Sequence[str], rows: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # The writer's PID in the name says which process computed the rows (a Dask worker or
        # the flow's own); the uuid keeps concurrent writers apart.
        path = self.folder / f"chunk-{os.getpid()}-{uuid.uuid4().hex}.npz"
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, sha256=np.asarray(shas), features=rows)
        tmp.rename(path)  # atomic: a killed run never leaves a half-written chunk behind
        self._read.add(path.name)
        self._index.update(zip(shas, rows, strict=True))

    def get(self, shas: Sequence[str]) -> np.ndarray:
        return np.stack([self._index[s] for s in shas]).astype(np.float32)
