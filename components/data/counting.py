"""Counting a validated dataset: totals and per-class counts for every split."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pandas as pd

# Above this ratio of the largest to the smallest class (training split) the data is called
# imbalanced: plain accuracy then mostly measures the majority class.
IMBALANCE_RATIO = 10.0


@dataclass(frozen=True)
class DatasetCounts:
    """How much data there is, where "small" vs "large" is judged per class, not in total."""

    total: int
    per_split: dict[str, int]
    per_class: dict[str, dict[str, int]]  # label -> split -> count
    classes: tuple[str, ...]
    min_train_per_class: int
    median_short_side: int  # of training images, for choosing the input resolution

    @property
    def imbalance_ratio(self) -> float:
        """Largest over smallest class in the training split (inf when a class has none)."""
        counts = [self.per_class[c].get("train", 0) for c in self.classes]
        return max(counts) / min(counts) if min(counts) > 0 else float("inf")

    @property
    def imbalanced(self) -> bool:
        return self.imbalance_ratio > IMBALANCE_RATIO

    def to_dict(self) -> dict[str, object]:
        return {
            **asdict(self),
            "imbalance_ratio": None
            if self.imbalance_ratio == float("inf")
            else self.imbalance_ratio,
            "imbalanced": self.imbalanced,
        }

    def to_markdown(self) -> str:
        splits = sorted(self.per_split, key=["train", "val", "test"].index)
        lines = ["| class | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
        for label in self.classes:
            cells = " | ".join(str(self.per_class[label].get(s, 0)) for s in splits)
            lines.append(f"| {label} | {cells} |")
        lines.append("| **total** | " + " | ".join(str(self.per_split[s]) for s in splits) + " |")
        return "\n".join(lines)


def count_dataset(manifest: pd.DataFrame) -> DatasetCounts:
    """Count the usable rows of a manifest (the caller passes the validated one)."""
    table = manifest.groupby(["label", "split"]).size().unstack(fill_value=0)
    classes = tuple(sorted(manifest["label"].unique()))
    per_class = {label: {s: int(table.loc[label, s]) for s in table.columns} for label in classes}
    train = manifest[manifest["split"] == "train"]
    train_counts = train["label"].value_counts()
    short = train[["width", "height"]].min(axis=1)
    return DatasetCounts(
        total=len(manifest),
        per_split={s: int(n) for s, n in manifest["split"].value_counts().items()},
        per_class=per_class,
        classes=classes,
        min_train_per_class=int(train_counts.reindex(list(classes), fill_value=0).min()),
        median_short_side=int(short.median()) if len(short) else 0,
    )
