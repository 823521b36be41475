"""What changed between the data a run trained on and the data now: files added, removed, changed.

A retrain after a small change can reuse what the last run measured (its verification verdict)
and continue from its weights instead of starting over; how small is a share of files, counted
here from the two runs' usable manifests. Files are matched by their path inside the data folder;
one whose content, label or split differs counts as changed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pandas as pd

from components.common.fingerprint import RunRecord

_KEYS = ("sha256", "label", "split")


@dataclass(frozen=True)
class DataChange:
    previous: int  # images the earlier run used
    current: int
    added: int
    removed: int
    changed: int
    # Files the earlier run trained on that are validation or test images now: a model trained
    # then has seen them, so it cannot be continued (splits follow paths; small classes may move).
    left_training: int = 0

    @property
    def share(self) -> float:
        """Files added, removed or changed, as a share of the earlier run's files."""
        return (self.added + self.removed + self.changed) / max(self.previous, 1)

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "share": round(self.share, 4)}

    def sentence(self) -> str:
        return (
            f"{self.added} added, {self.removed} removed, {self.changed} changed of "
            f"{self.previous} images ({100 * self.share:.1f}%)"
        )


def manifest_change(previous: pd.DataFrame, current: pd.DataFrame) -> DataChange:
    """The change from ``previous`` to ``current`` (manifests with relpath, sha256, label, split)."""
    before = previous.set_index("relpath").loc[:, list(_KEYS)].astype(str)
    after = current.set_index("relpath").loc[:, list(_KEYS)].astype(str)
    kept = before.index.intersection(after.index)
    differs = (before.loc[kept] != after.loc[kept]).any(axis=1)
    was_train = before.loc[kept, "split"] == "train"
    held_out_now = after.loc[kept, "split"] != "train"
    return DataChange(
        previous=len(before),
        current=len(after),
        added=len(after.index.difference(before.index)),
        removed=len(before.index.difference(after.index)),
        changed=int(differs.sum()),
        left_training=int((was_train & held_out_now).sum()),
    )


@dataclass(frozen=True)
class PreviousRun:
    """The last successful run of a dataset, seen from this one: what it recorded, how the data
    changed since, and whether it was given the same configuration and backbone."""

    record: RunRecord
    change: DataChange
    same_config: bool
