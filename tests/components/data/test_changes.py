"""Counting what changed between two runs' manifests."""

import pandas as pd
import pytest

from components.data.changes import manifest_change


def _manifest(rows: list[tuple[str, str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["relpath", "sha256", "label", "split"])


def test_added_removed_and_changed_files_are_counted_by_path() -> None:
    before = _manifest(
        [(f"a/{i}.png", f"s{i}", "a", "train") for i in range(18)]
        + [("b/x.png", "sx", "b", "val"), ("b/y.png", "sy", "b", "train")]
    )
    after = _manifest(
        [(f"a/{i}.png", f"s{i}", "a", "train") for i in range(1, 18)]  # a/0.png removed
        + [("b/x.png", "sx2", "b", "val")]  # new content
        + [("b/y.png", "sy", "a", "train")]  # relabelled
        + [("b/z.png", "sz", "b", "test"), ("b/w.png", "sw", "b", "train")]  # added
    )
    change = manifest_change(before, after)
    assert (change.previous, change.current) == (20, 21)
    assert (change.added, change.removed, change.changed) == (2, 1, 2)
    assert change.share == pytest.approx(5 / 20)
    assert change.sentence() == "2 added, 1 removed, 2 changed of 20 images (25.0%)"
    assert manifest_change(before, before).share == 0
    assert change.left_training == 0
    held_out = before.assign(split=before["split"].where(before["relpath"] != "a/3.png", "test"))
    moved = manifest_change(before, held_out)
    assert (moved.changed, moved.left_training) == (1, 1)  # trained on then, a test image now
    assert manifest_change(held_out, before).left_training == 0  # the other way is no leak
