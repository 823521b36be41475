"""Imbalance is judged on the training split: largest over smallest class, against 10x."""

from __future__ import annotations

import json

from components.data.counting import DatasetCounts


def _counts(train: dict[str, int]) -> DatasetCounts:
    return DatasetCounts(
        total=sum(train.values()),
        per_split={"train": sum(train.values())},
        per_class={c: {"train": n} for c, n in train.items()},
        classes=tuple(sorted(train)),
        min_train_per_class=min(train.values()),
        median_short_side=64,
    )


def test_imbalance_ratio_and_flag() -> None:
    assert not _counts({"a": 100, "b": 10}).imbalanced  # exactly 10x: not over
    skewed = _counts({"a": 200, "b": 57, "c": 15})
    assert skewed.imbalanced and abs(skewed.imbalance_ratio - 200 / 15) < 1e-9
    assert json.loads(json.dumps(skewed.to_dict()))["imbalanced"] is True


def test_a_class_missing_from_train_is_imbalanced_and_stays_json() -> None:
    counts = _counts({"a": 5, "b": 0})
    assert counts.imbalanced
    assert json.dumps(counts.to_dict(), allow_nan=False)
