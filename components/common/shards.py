"""Cutting work into shards and putting the shards' results back together, for stages spread over
worker processes (a Dask cluster). Plain Python: the order of the merged results depends only on
the order of the input, never on which shard finished first, so a sharded run writes what one
process writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")


def shard_size(size: int, batch: int) -> int:
    """``size`` rounded up to whole batches of ``batch``, so every shard but the last holds only
    full batches: the batches a shard runs are then those one process would have run."""
    return max(1, -(-size // batch)) * batch


def split_shards(items: Sequence[T], size: int) -> list[list[T]]:
    """``items`` in consecutive shards of ``size`` (the last may be shorter); none when empty."""
    if size < 1:
        raise ValueError(f"shard size must be at least 1, not {size}")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def merge_shards(results: Iterable[Sequence[T]]) -> list[T]:
    """The shards' results, concatenated in shard order."""
    return [item for part in results for item in part]
