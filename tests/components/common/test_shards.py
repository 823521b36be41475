"""Shards cut in order and merged back in order, whatever their sizes."""

from __future__ import annotations

import pytest

from components.common.shards import merge_shards, shard_size, split_shards


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 80])
@pytest.mark.parametrize("size", [1, 16, 64])
def test_split_then_merge_gives_back_the_items_in_order(n: int, size: int) -> None:
    items = [f"file-{i}" for i in range(n)]
    shards = split_shards(items, size)
    assert all(0 < len(s) <= size for s in shards)
    assert all(len(s) == size for s in shards[:-1])
    assert merge_shards(shards) == items


def test_merge_follows_shard_order_not_completion_order() -> None:
    results = {1: ["c", "d"], 0: ["a", "b"], 2: ["e"]}  # as they finished
    assert merge_shards(results[i] for i in sorted(results)) == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize(
    ("size", "batch", "expected"), [(16, 64, 64), (64, 64, 64), (65, 64, 128), (100, 8, 104)]
)
def test_shard_size_rounds_up_to_whole_batches(size: int, batch: int, expected: int) -> None:
    assert shard_size(size, batch) == expected


def test_a_shard_size_below_one_is_a_bug() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        split_shards([1, 2], 0)
