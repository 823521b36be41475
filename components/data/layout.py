"""Which folders of a data folder are splits and which are classes: decided, or refused with why.

Two layouts are understood: class folders (``ROOT/<class>/<image>``, split by us) and split
folders (``ROOT/{train,val,test}/<class>/<image>``, split names matched case-insensitively with
their common aliases). Anything that would need a guess to label (split folders beside class
folders, one split folder alone, class folders inside one wrapper folder, split folders inside
class folders) is refused with the folders it found and the layout it expected, because a guess
here silently trains a model on the wrong labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from components.common.errors import DataValidationError, LayoutError
from components.data.tree import Entry, FolderWalk

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
CLASS_LAYOUT = "ROOT/<class>/<image> (class folders only)"
SPLIT_LAYOUT = "ROOT/{train,val,test}/<class>/<image> (split folders only; val/ or test/ optional)"
EXPECTED = f"expected either {CLASS_LAYOUT} or {SPLIT_LAYOUT}"
_SHOWN = 10


@dataclass(frozen=True)
class Source:
    """One folder whose sub-folders are classes, and the split it stands for (None: we split)."""

    split: str | None
    folder: Entry
    classes: tuple[Entry, ...]


@dataclass(frozen=True)
class Layout:
    """The folders to read, which layout they follow, and the notes worth telling the user."""

    kind: Literal["classes", "splits"]
    sources: tuple[Source, ...]
    notes: tuple[str, ...]
    loose: tuple[Entry, ...] = ()  # files lying where class folders were expected: no label

    @property
    def has_val(self) -> bool:
        return any(s.split == "val" for s in self.sources)


def _names(entries: list[Entry], slash: bool = True) -> str:
    shown = [e.name + ("/" if slash and e.is_dir else "") for e in entries[:_SHOWN]]
    more = len(entries) - _SHOWN
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _folders(walk: FolderWalk, folder: Entry) -> list[Entry]:
    return [e for e in walk.entries(folder) if e.is_dir]


def _split_folders(walk: FolderWalk, dirs: list[Entry]) -> dict[str, Entry]:
    by_split: dict[str, list[Entry]] = {}
    for entry in dirs:
        if (split := SPLIT_ALIASES.get(entry.name.lower())) is not None:
            by_split.setdefault(split, []).append(entry)
    for split, entries in by_split.items():
        if len(entries) > 1:
            raise LayoutError(
                f"{walk.root} has {len(entries)} folders for the {split} split "
                f"({_names(entries)}); keep one of them"
            )
    return {split: entries[0] for split, entries in by_split.items()}


def _split_layout(walk: FolderWalk, splits: dict[str, Entry], loose: list[Entry]) -> Layout:
    names = _names(list(splits.values()))
    if "train" not in splits:
        raise LayoutError(
            f"{walk.root} has split folder(s) {names} but no train/ folder; {SPLIT_LAYOUT} "
            "needs a train/ folder"
        )
    if len(splits) == 1:
        train = splits["train"].name
        raise LayoutError(
            f"{walk.root} has a {train}/ folder and no other: a split folder alone is not a "
            f"layout. {EXPECTED}. Add val/ or test/ beside it, or use {walk.root / train} itself "
            "as the data folder to have it split"
        )
    sources, notes = [], []
    for split in ("train", "val", "test"):
        if split not in splits:
            continue
        folder = splits[split]
        entries = walk.entries(folder)
        classes = [e for e in entries if e.is_dir]
        loose += [e for e in entries if not e.is_dir]
        if not classes:
            raise LayoutError(
                f"split folder {walk.relative(folder.path)}/ under {walk.root} holds no class "
                f"folders; {SPLIT_LAYOUT}"
            )
        nested = [c for c in classes if SPLIT_ALIASES.get(c.name.lower()) is not None]
        if nested:
            raise LayoutError(
                f"split folder {walk.relative(folder.path)}/ under {walk.root} holds split "
                f"folders ({_names(nested)}) where class folders belong; {SPLIT_LAYOUT}"
            )
        sources.append(Source(split, folder, tuple(classes)))
    if "val" not in splits:
        notes.append(
            f"no val/ folder: validation images are carved from {splits['train'].name}/ "
            f"(a seeded, stratified share); {splits['test'].name}/ is kept as given"
        )
    return Layout("splits", tuple(sources), tuple(notes), tuple(loose))


def _class_layout(walk: FolderWalk, classes: list[Entry], loose: list[Entry]) -> Layout:
    inner = {c.name: _folders(walk, c) for c in classes}
    if len(classes) == 1 and inner[classes[0].name]:
        only = classes[0]
        raise LayoutError(
            f"{walk.root} holds one folder, {only.name}/, which holds folders "
            f"{_names(inner[only.name])}: class folders must sit directly in the data folder "
            f"({EXPECTED}). If {only.name}/ holds the classes, use {only.path} as the data folder"
        )
    with_splits = {
        name: [d for d in dirs if d.name.lower() in SPLIT_ALIASES] for name, dirs in inner.items()
    }
    with_splits = {name: dirs for name, dirs in with_splits.items() if dirs}
    if with_splits:
        listed = "; ".join(f"{name}/ holds {_names(dirs)}" for name, dirs in with_splits.items())
        raise LayoutError(
            f"class folders under {walk.root} hold split folders ({listed}); splits go above "
            f"the classes: {SPLIT_LAYOUT}, or remove the split folders for {CLASS_LAYOUT}"
        )
    return Layout("classes", (Source(None, walk.top(), tuple(classes)),), (), tuple(loose))


def detect_layout(walk: FolderWalk) -> Layout:
    """Decide the layout of ``walk``'s folder from its folder names, or raise ``LayoutError``."""
    top = walk.entries(walk.top())
    dirs = [e for e in top if e.is_dir]
    if not dirs:
        raise LayoutError(
            f"no images found under {walk.root}: it holds no folders "
            f"({len(top)} file(s) directly in it, which have no class); {EXPECTED}"
        )
    splits = _split_folders(walk, dirs)
    others = [d for d in dirs if d.name.lower() not in SPLIT_ALIASES]
    if splits and others:
        raise LayoutError(
            f"{walk.root} mixes split folders ({_names(list(splits.values()))}) with other "
            f"folders ({_names(others)}); {EXPECTED}. Move {_names(others)} into the split "
            "folders as classes, or out of the data folder"
        )
    loose = [e for e in top if not e.is_dir]
    if splits:
        return _split_layout(walk, splits, loose)
    return _class_layout(walk, others, loose)


def open_layout(root: Path, follow_external_links: bool = False) -> tuple[FolderWalk, Layout]:
    """A walk over ``root`` and its layout; cheap (folder names only), so callers can check early."""
    root = Path(root)
    if not root.exists():
        raise DataValidationError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DataValidationError(f"dataset path {root} is a file, not a folder of class folders")
    walk = FolderWalk(root, follow_external_links)
    return walk, detect_layout(walk)
