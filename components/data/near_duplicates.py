"""Near-duplicates: re-encoded, resized or cropped copies that byte-level checks cannot see.

A held-out copy of a training image makes validation accuracy a measure of memory, not of
generalisation, and a copy under another label teaches both labels. Comparing every pair of images
by pixels would cost N² decodes, so the search runs in two steps: candidates are each image's
nearest neighbours by cosine similarity of the pooled head features the pipeline has already cached
(a blocked matrix product; no index is needed at these sizes), and only candidate pairs are
confirmed by a perceptual hash (Hamming distance), which looks at the pixels and so tells a copy
from two photos of the same kind of thing, which the features alone rate as close.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pandas as pd

from components.common.config import DataConfig, ValidationConfig
from components.data.scan import assign_splits
from components.engine.images import open_image

SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
_EXAMPLES = 10


@dataclass(frozen=True)
class NearDuplicatePair:
    """Two images judged copies of each other; ``first`` is the one kept when one must go."""

    first: str  # path
    second: str
    first_split: str
    second_split: str
    first_label: str
    second_label: str
    cosine: float
    distance: int  # Hamming distance of the perceptual hashes

    @property
    def cross_split(self) -> bool:
        return self.first_split != self.second_split

    @property
    def label_conflict(self) -> bool:
        return self.first_label != self.second_label

    def describe(self) -> str:
        return f"cosine {self.cosine:.3f}, hash distance {self.distance}"


@dataclass(frozen=True)
class NearDuplicates:
    """What the search found: confirmed pairs, what is quarantined (path -> reason), and effort."""

    n_images: int
    n_candidates: int
    pairs: tuple[NearDuplicatePair, ...]
    quarantined: dict[str, str]
    n_too_small: int = 0  # images under near_duplicate_min_side, not searched

    @property
    def leaks(self) -> tuple[NearDuplicatePair, ...]:
        return tuple(p for p in self.pairs if p.cross_split)

    @property
    def label_conflicts(self) -> tuple[NearDuplicatePair, ...]:
        return tuple(p for p in self.pairs if p.label_conflict)

    def to_dict(self, contact_sheet: Path | None = None) -> dict[str, Any]:
        def rows(pairs: tuple[NearDuplicatePair, ...]) -> list[dict[str, Any]]:
            return [vars(p) for p in pairs[:_EXAMPLES]]

        return {
            "n_images": self.n_images,
            "n_candidates": self.n_candidates,
            "n_too_small": self.n_too_small,
            "n_pairs": len(self.pairs),
            "n_cross_split": len(self.leaks),
            "n_label_conflicts": len(self.label_conflicts),
            "n_quarantined": len(self.quarantined),
            "cross_split_examples": rows(self.leaks),
            "label_conflict_examples": rows(self.label_conflicts),
            "contact_sheet": None if contact_sheet is None else str(contact_sheet),
        }


def candidate_pairs(
    embeddings: np.ndarray, min_cosine: float, neighbours: int, block: int
) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, cosine)`` with ``i < j``, each among the other's ``neighbours`` nearest
    (either way round) and at least ``min_cosine`` apart; sorted, so the result is deterministic.

    The product runs ``block`` rows at a time, so memory stays at ``block x N`` floats.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    n = len(x)
    if n < 2:
        return []
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = min(neighbours, n - 1)
    found: dict[tuple[int, int], float] = {}
    for start in range(0, n, block):
        sims = x[start : start + block] @ x.T
        rows = np.arange(len(sims))
        sims[rows, start + rows] = -np.inf  # an image is not its own neighbour
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        for r, cols in enumerate(top):
            i = start + r
            for j in cols.tolist():
                s = float(sims[r, j])
                if s >= min_cosine:
                    found[(min(i, j), max(i, j))] = s
    return sorted((i, j, s) for (i, j), s in found.items())


def perceptual_hash(path: str, kind: str, max_pixels: int | None = None) -> imagehash.ImageHash:
    """The 64-bit perceptual hash of the upright image (``phash``: DCT; ``dhash``: gradients)."""
    img = open_image(path, max_pixels)
    return imagehash.phash(img) if kind == "phash" else imagehash.dhash(img)


def _ordered(manifest: pd.DataFrame) -> pd.DataFrame:
    """Rows by split (train first) then path: the kept side of a pair is the earlier row."""
    rank = manifest["split"].map(SPLIT_ORDER).fillna(len(SPLIT_ORDER))
    return (
        manifest.assign(_rank=rank, _row=np.arange(len(manifest)))
        .sort_values(["_rank", "relpath", "_row"], kind="stable")
        .reset_index(drop=True)
    )


def _quarantine(pairs: list[NearDuplicatePair]) -> dict[str, str]:
    """The held-out side of every cross-split pair, with the reason; one reason per file."""
    reasons: dict[str, str] = {}
    for p in pairs:
        if not p.cross_split or p.second in reasons:
            continue
        conflict = f", labelled {p.second_label} there {p.first_label}" if p.label_conflict else ""
        reasons[p.second] = (
            f"near-duplicate of {p.first_split} file {p.first} ({p.describe()}{conflict}) (leakage)"
        )
    return reasons


def copy_groups(pairs: tuple[NearDuplicatePair, ...], max_size: int) -> dict[str, str]:
    """Path -> its group's first path, for every image in a near-copy group of one label.

    A group is meant to be the copies of one thing (a photo and its edits, one object's few
    exposures), which must land in one split. Letting pairs chain freely links distinct images
    that merely look alike: on magnetic tiles, pairs across labels joined whole classes into one
    group. So a group grows from its closest pairs first and never past ``max_size`` images, and
    a pair across labels joins nothing (it is a label conflict, reported and quarantined).
    """
    root: dict[str, str] = {}
    members: dict[str, list[str]] = {}

    def find(path: str) -> str:
        root.setdefault(path, path)
        members.setdefault(path, [path])
        while root[path] != path:
            root[path] = root[root[path]]
            path = root[path]
        return path

    closest_first = sorted(pairs, key=lambda p: (-p.cosine, p.distance, p.first, p.second))
    for p in closest_first:
        if p.label_conflict:
            continue
        a, b = sorted((find(p.first), find(p.second)))
        if a == b or len(members[a]) + len(members[b]) > max_size:
            continue
        root[b] = a
        members[a] += members.pop(b)
    return {m: min(group) for group in members.values() if len(group) > 1 for m in group}


def _held_out_second(pair: NearDuplicatePair) -> NearDuplicatePair:
    """The pair ordered so that ``second`` is the side in the later split (the one to drop)."""
    if SPLIT_ORDER.get(pair.first_split, 3) <= SPLIT_ORDER.get(pair.second_split, 3):
        return pair
    return NearDuplicatePair(
        pair.second, pair.first, pair.second_split, pair.first_split,
        pair.second_label, pair.first_label, pair.cosine, pair.distance,
    )  # fmt: skip


def with_splits(found: NearDuplicates, splits: Mapping[str, str]) -> NearDuplicates:
    """``found`` after its images moved to ``splits`` (path -> split): pairs carry the new splits
    and the quarantine holds the held-out side of those still across splits."""
    pairs = tuple(
        _held_out_second(replace(p, first_split=splits[p.first], second_split=splits[p.second]))
        for p in found.pairs
    )
    return replace(found, pairs=pairs, quarantined=_quarantine(list(pairs)))


@dataclass(frozen=True)
class Regrouped:
    """Near-copy groups and what moved to keep each whole in one split (nothing, on the user's
    splits), and what is still quarantined."""

    found: NearDuplicates  # pairs with their new splits; the quarantine of those still across
    moves: dict[str, str]  # path -> its new split
    groups: dict[str, str]  # path -> its group's key (the relpath of its first file)

    @property
    def n_groups(self) -> int:
        return len(set(self.groups.values()))

    @property
    def largest_group(self) -> int:
        return max(Counter(self.groups.values()).values(), default=0)

    def section(self, contact_sheet: Path | None) -> dict[str, Any]:
        return self.found.to_dict(contact_sheet) | {
            "n_moved": len(self.moves),
            "n_groups": self.n_groups,
            "largest_group": self.largest_group,
            "moved_examples": dict(list(self.moves.items())[:_EXAMPLES]),
        }


def group_keys(
    manifest: pd.DataFrame, pairs: tuple[NearDuplicatePair, ...], max_size: int
) -> dict[str, str]:
    """Path -> its near-copy group's key (the relpath of the group's first file), for grouped
    files only: the manifest's ``group`` column, which keeps copies in one fold wherever the
    training rows are split again (cross-validation, the nested split)."""
    relpath = dict(zip(manifest["path"], manifest["relpath"], strict=True))
    return {path: relpath[first] for path, first in copy_groups(pairs, max_size).items()}


def regroup(
    manifest: pd.DataFrame, found: NearDuplicates, data: DataConfig, seed: int, max_size: int
) -> Regrouped:
    """For splits the pipeline drew: each near-copy group goes whole to the split its first file
    by path was drawn into (``assign_splits`` with groups), instead of losing its held-out side.

    Quarantining alone emptied held-out sets where data comes in groups (magnetic tiles: 145 of
    172 held-out images). Files in no group keep their split, so a dataset without copies is split
    exactly as before.
    """
    groups = group_keys(manifest, found.pairs, max_size)
    keys = manifest["path"].map(groups).fillna(manifest["relpath"])
    drawn = assign_splits(manifest, data, seed, groups=keys)
    splits = dict(zip(manifest["path"], manifest["split"], strict=True))
    moves = {
        path: new
        for path, new in zip(manifest["path"], drawn, strict=True)
        if path in groups and new != splits[path]
    }
    return Regrouped(with_splits(found, splits | moves), moves, groups)


def place_copies(
    manifest: pd.DataFrame,
    found: NearDuplicates,
    cfg: ValidationConfig,
    data: DataConfig,
    seed: int,
    drawn: bool,
) -> Regrouped:
    """Where the pipeline drew the splits (``drawn``) and ``near_duplicate_regroup`` is on, each
    group of copies moves whole into one split; otherwise nothing moves (the user's splits are
    theirs) and the groups are only keyed, for the folds of later splits of the training rows."""
    if cfg.near_duplicate_regroup and drawn:
        return regroup(manifest, found, data, seed, cfg.near_duplicate_group_max)
    return Regrouped(found, {}, group_keys(manifest, found.pairs, cfg.near_duplicate_group_max))


def _allowed_distance(cosine: float, cfg: ValidationConfig) -> int:
    """Hash bits a candidate may differ by: more when its features agree closely (a crop)."""
    if cosine >= cfg.near_duplicate_close_cosine:
        return cfg.near_duplicate_max_distance
    return cfg.near_duplicate_far_distance


def find_near_duplicates(
    manifest: pd.DataFrame, embeddings: np.ndarray, cfg: ValidationConfig
) -> NearDuplicates:
    """Confirmed near-duplicate pairs among ``manifest``'s rows (``embeddings`` in row order).

    Hashes are computed only for images in a candidate pair, once each.
    """
    frame = _ordered(manifest)
    if {"width", "height"} <= set(frame.columns):
        side = np.minimum(frame["width"].astype(int), frame["height"].astype(int))
        frame = frame[side >= cfg.near_duplicate_min_side].reset_index(drop=True)
    vectors = np.asarray(embeddings)[frame["_row"].to_numpy()]
    candidates = candidate_pairs(
        vectors,
        cfg.near_duplicate_min_cosine,
        cfg.near_duplicate_neighbours,
        cfg.near_duplicate_block,
    )
    hashes: dict[int, imagehash.ImageHash] = {}

    def hash_of(i: int) -> imagehash.ImageHash:
        if i not in hashes:
            hashes[i] = perceptual_hash(
                frame.at[i, "path"], cfg.near_duplicate_hash, cfg.max_image_pixels
            )
        return hashes[i]

    pairs = []
    for i, j, cosine in candidates:
        distance = int(hash_of(i) - hash_of(j))
        if distance > _allowed_distance(cosine, cfg):
            continue
        a, b = frame.loc[i], frame.loc[j]
        pairs.append(
            NearDuplicatePair(
                a["path"], b["path"], a["split"], b["split"], a["label"], b["label"],
                round(cosine, 4), distance,
            )
        )  # fmt: skip
    return NearDuplicates(
        len(frame), len(candidates), tuple(pairs), _quarantine(pairs), len(manifest) - len(frame)
    )
