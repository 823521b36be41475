"""A scan whose files are read in shards, finishing in any order, writes the same manifest."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from components.common.config import DataConfig, ValidationConfig
from components.common.shards import merge_shards, split_shards
from components.data.scan import inspect_files, scan_folder


def test_sharded_inspection_gives_the_same_manifest(digits_root: Path, tmp_path: Path) -> None:
    calls: list[int] = []

    def sharded(paths: Sequence[Path], max_pixels: int) -> list[dict[str, object]]:
        shards = split_shards(paths, 7)
        done = {i: inspect_files(shards[i], max_pixels) for i in reversed(range(len(shards)))}
        calls.append(len(shards))
        return merge_shards(done[i] for i in range(len(shards)))

    args = (digits_root, DataConfig(), ValidationConfig(), 0)
    expected = scan_folder(*args).manifest
    result = scan_folder(*args, cache_path=tmp_path / "scan.sqlite", inspect=sharded)
    assert calls == [-(-len(expected) // 7)]
    pd.testing.assert_frame_equal(result.manifest, expected)
    assert result.manifest.to_csv(index=False) == expected.to_csv(index=False)
    # A rescan reads nothing: the cache the sharded scan wrote holds every file.
    again = scan_folder(*args, cache_path=tmp_path / "scan.sqlite", inspect=sharded)
    assert calls[-1:] == [0] and again.from_cache == len(expected)
    pd.testing.assert_frame_equal(again.manifest, expected)
