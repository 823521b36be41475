"""Scanning a labelled image folder into a manifest: one row per file, nothing moved or rewritten.

Which folders are classes and splits is decided in ``layout`` (or refused there), what is clutter
and which links are followed in ``tree``. Every image file is read once here to hash and decode
it, so later stages can trust the manifest instead of touching the disk again; what was left out
is kept in a ``ScanSummary`` for the validation report.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, UnidentifiedImageError

from components.common.config import DataConfig, ValidationConfig
from components.common.errors import DataValidationError
from components.data import scan_cache
from components.data.layout import Layout, open_layout
from components.data.tree import Entry, FolderWalk, Skipped
from components.engine.images import refuse_bombs

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = (
    "path",
    "relpath",
    "label",
    "split",
    "bytes",
    "sha256",
    "format",
    "width",
    "height",
    "mode",
    "decodable",
    "error",
)
_SHOWN = 5

# Reads (hashes and decodes) files into detail rows, in the files' order: ``inspect_files`` in
# this process, or one that spreads them over worker processes and merges the rows in order.
Inspector = Callable[[Sequence[Path], int], list[dict[str, object]]]


@dataclass(frozen=True)
class ScanSummary:
    """What the scan decided and what it left out, for the validation report and the run JSON."""

    layout: str  # "classes" or "splits"
    notes: tuple[str, ...] = ()
    clutter: dict[str, int] = field(default_factory=dict)  # category -> entries ignored
    clutter_examples: tuple[str, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    non_image_files: int = 0

    def clutter_line(self) -> str | None:
        """One line such as "ignored 14 clutter entries: 9 hidden, 3 __MACOSX, 2 Thumbs.db"."""
        total = sum(self.clutter.values())
        if not total:
            return None
        parts = ", ".join(f"{n} {kind}" for kind, n in self.clutter.items())
        return f"ignored {total} clutter {'entry' if total == 1 else 'entries'}: {parts}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "notes": list(self.notes),
            "clutter": dict(self.clutter),
            "clutter_total": sum(self.clutter.values()),
            "clutter_summary": self.clutter_line(),
            "clutter_examples": list(self.clutter_examples),
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
            "non_image_files": self.non_image_files,
        }

    def to_markdown(self) -> list[str]:
        """Lines for the validation report: layout, notes, clutter and skipped entries."""
        lines = [f"Layout: {self.layout} folders."]
        lines += [f"- {note}" for note in self.notes]
        if (line := self.clutter_line()) is not None:
            lines.append(f"- {line}")
        for s in self.skipped:
            lines.append(f"- skipped {s.path}: {s.reason}")
        return lines


@dataclass(frozen=True)
class ScanResult:
    """The manifest (columns ``MANIFEST_COLUMNS``), what the scan left out of it, and how many
    rows came from the scan cache rather than from reading the file."""

    manifest: pd.DataFrame
    summary: ScanSummary
    from_cache: int = 0


def _hash_file(path: Path) -> tuple[bytes, str]:
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def inspect_file(path: Path, max_pixels: int) -> dict[str, object]:
    """Hash and fully decode one file; failures become a reason string, never an exception."""
    row: dict[str, object] = {"format": "", "width": 0, "height": 0, "mode": "", "error": ""}
    try:
        data, digest = _hash_file(path)
    except OSError as err:
        return {**row, "bytes": 0, "sha256": "", "decodable": False, "error": f"unreadable: {err}"}
    row.update(bytes=len(data), sha256=digest)
    if not data:
        return {**row, "decodable": False, "error": "zero-byte file"}
    try:
        with Image.open(path) as img:
            row.update(format=img.format or "", width=img.width, height=img.height, mode=img.mode)
            refuse_bombs(img, max_pixels)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return {**row, "decodable": False, "error": f"decompression bomb: {err}"}
    except UnidentifiedImageError:
        return {**row, "decodable": False, "error": "not an image Pillow can identify"}
    except Exception as err:
        # Pillow's decoders raise whatever a malformed file trips (OSError, SyntaxError,
        # struct.error, IndexError, EOFError...): each says something about the file, not a bug.
        return {**row, "decodable": False, "error": f"cannot decode: {err or type(err).__name__}"}
    return {**row, "decodable": True}


def inspect_files(paths: Sequence[Path], max_pixels: int) -> list[dict[str, object]]:
    """``inspect_file`` of every path, in a thread pool (reading and decoding release the GIL);
    rows in ``paths`` order."""
    workers = min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: inspect_file(p, max_pixels), paths))


def _shown(paths: list[str]) -> str:
    more = len(paths) - _SHOWN
    return ", ".join(paths[:_SHOWN]) + (f" and {more} more" if more > 0 else "")


def _is_image(entry: Entry, extensions: tuple[str, ...]) -> bool:
    return entry.path.suffix.lower() in {e.lower() for e in extensions}


def _collect(
    walk: FolderWalk, layout: Layout, cfg: DataConfig
) -> tuple[list[tuple[Entry, str, str | None]], list[str], int]:
    """(file, label, split or None) for every image under a class folder, notes, non-images."""
    found: list[tuple[Entry, str, str | None]] = []
    files_per_class: Counter[str] = Counter()
    nested: dict[str, set[str]] = {}
    other: list[str] = []
    for source in layout.sources:
        for class_dir in source.classes:
            files_per_class[class_dir.name] += 0
            for entry in walk.files_under(class_dir):
                if not _is_image(entry, cfg.extensions):
                    other.append(walk.relative(entry.path))
                    continue
                files_per_class[class_dir.name] += 1
                found.append((entry, class_dir.name, source.split))
                if os.path.dirname(entry.path) != os.fspath(class_dir.path):
                    below = entry.path.relative_to(class_dir.path).parts[0]
                    nested.setdefault(class_dir.name, set()).add(below)
    walk.refuse_external_links()
    empty = sorted(c for c, n in files_per_class.items() if n == 0)
    if empty:
        raise DataValidationError(
            f"class folder(s) {', '.join(empty)} under {walk.root} contain no image files; "
            "remove the folder or add images (accepted extensions: "
            f"{', '.join(cfg.extensions)})"
        )
    notes = list(layout.notes)
    if nested:
        listed = "; ".join(
            f"{label}/ ({', '.join(sorted(subs)[:_SHOWN])})"
            for label, subs in sorted(nested.items())
        )
        notes.append(f"images in sub-folders take their class folder's label: {listed}")
    unlabelled = [walk.relative(e.path) for e in layout.loose if _is_image(e, cfg.extensions)]
    if unlabelled:
        notes.append(
            f"{len(unlabelled)} image file(s) lie outside any class folder and are not used "
            f"(a label is only ever a class folder's name): {_shown(unlabelled)}"
        )
    if other:
        notes.append(f"ignored {len(other)} non-image file(s): {_shown(other)}")
    n_other = len(other) + len(layout.loose) - len(unlabelled)
    return found, notes, n_other


def _unit_hash(relpath: str, seed: int) -> float:
    """A number in [0, 1) fixed by the file's path and the seed alone."""
    digest = hashlib.sha256(f"{seed}:{relpath}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _min_train(n: int) -> int:
    return max(math.ceil(n / 2), min(n - 2, 5))


def assign_splits(
    frame: pd.DataFrame,
    cfg: DataConfig,
    seed: int,
    with_test: bool = True,
    groups: pd.Series | None = None,
) -> pd.Series:
    """A seeded split, stratified by class, where each file's split depends on its own path only.

    A file goes to validation when its path's hash falls below ``val_fraction``, to test when it
    falls in the next ``test_fraction``, so files joining a dataset do not move the old ones: a
    test image of one run is not a training image of the next, the test set stays comparable
    across retrains, and a model trained before can be fine-tuned further without leaking. Shares
    are exact in expectation, not per class. A class of three or more files keeps at least one
    validation file, and for training at least half its files and at least five (or all but two):
    when chance left fewer, the files nearest the boundary move (the smallest hash to validation,
    the largest held-out ones to training). Only small classes ever need that; a warm start
    checks for the rare file it moved out of training (``DataChange.left_training``).

    ``groups`` (a key per row, default its ``relpath``) keeps files together: a group is placed
    as its key's file would be, whole, so copies of one thing never straddle two splits.
    """
    keys = frame["relpath"] if groups is None else groups
    split = pd.Series("train", index=frame.index)
    test_fraction = cfg.test_fraction if with_test else 0.0
    for _, rows in frame.groupby("label"):
        if len(rows) < 3:
            continue
        row_keys = keys[rows.index]
        size = row_keys.value_counts()  # files per key
        unit = pd.Series({k: _unit_hash(k, seed) for k in size.index}).sort_values()
        chosen = pd.Series("train", index=unit.index)
        chosen[unit < cfg.val_fraction + test_fraction] = "test"
        chosen[unit < cfg.val_fraction] = "val"
        if not (chosen == "val").any():
            chosen[unit.index[0]] = "val"
        short = _min_train(len(rows)) - int(size[chosen == "train"].sum())
        for key in reversed(chosen.index[chosen != "train"]):  # largest hash first
            if short <= 0:
                break
            if chosen[key] == "val" and (chosen == "val").sum() == 1:
                continue  # a group as large as the class's held-out share: val keeps it
            chosen[key] = "train"
            short -= int(size[key])
        split[rows.index] = row_keys.map(chosen)
    return split


def _summarise(walk: FolderWalk, layout: Layout, notes: list[str], n_other: int) -> ScanSummary:
    clutter = dict(sorted(walk.clutter.items(), key=lambda kv: (-kv[1], kv[0])))
    summary = ScanSummary(
        layout=layout.kind,
        notes=tuple(notes),
        clutter=clutter,
        clutter_examples=tuple(walk.clutter_examples),
        skipped=tuple(walk.skipped),
        non_image_files=n_other,
    )
    for note in summary.notes:
        log.info("%s: %s", walk.root, note)
    if (line := summary.clutter_line()) is not None:
        log.info("%s: %s", walk.root, line)
    for s in summary.skipped[:20]:
        log.warning("skipped %s: %s", s.path, s.reason)
    return summary


def _inspect_all(
    paths: list[Path], validation: ValidationConfig, cache_path: Path | None, inspect: Inspector
) -> tuple[list[dict[str, object]], int]:
    """One row per path: from the cache where the file's stat identity is unchanged, else read
    and decoded now; the cache is then rewritten to hold exactly these files."""
    max_pixels = validation.max_image_pixels
    known = {} if cache_path is None else scan_cache.load(cache_path, max_pixels)
    # Stat before reading: a file changed while it is read is keyed by its old identity, so the
    # next scan sees it differ and reads it again (never a new identity with old contents).
    keys = [scan_cache.file_key(p) for p in paths]
    details: list[dict[str, object] | None] = [
        None if key is None else known.get(key) for key in keys
    ]
    todo = [i for i, d in enumerate(details) if d is None]
    for i, detail in zip(todo, inspect([paths[i] for i in todo], max_pixels), strict=True):
        details[i] = detail
    done = [d for d in details if d is not None]
    # Nothing new, changed or gone: the cache on disk already says exactly this.
    if cache_path is not None and (todo or len(known) != len(paths) or None in keys):
        rows = [(k, d) for k, d in zip(keys, done, strict=True) if k is not None]
        scan_cache.save(cache_path, rows, max_pixels)
    return done, len(paths) - len(todo)


def scan_folder(
    root: Path,
    cfg: DataConfig,
    validation: ValidationConfig,
    seed: int,
    cache_path: Path | None = None,
    inspect: Inspector = inspect_files,
) -> ScanResult:
    """Walk ``root``, decide its layout, and read each new or changed image file into the
    manifest; with ``cache_path``, unchanged files take their row from the last scan there.
    ``inspect`` reads the files (the walk, the cache and the manifest stay in this process)."""
    root = Path(root)
    walk, layout = open_layout(root, cfg.follow_external_links)
    found, notes, n_other = _collect(walk, layout, cfg)
    if not found:
        raise DataValidationError(
            f"no images found under {root}: expected ROOT/<class>/<image> or "
            f"ROOT/train/<class>/<image> with extensions {', '.join(cfg.extensions)}"
        )
    paths = [f[0].path for f in found]
    details, from_cache = _inspect_all(paths, validation, cache_path, inspect)
    rows = [
        {
            "path": str(entry.path),
            "relpath": walk.relative(entry.path),
            "label": label,
            "split": split or "",
            **detail,
        }
        for (entry, label, split), detail in zip(found, details, strict=True)
    ]
    frame = pd.DataFrame(rows)
    if layout.kind == "classes":
        frame["split"] = assign_splits(frame, cfg, seed)
    elif not layout.has_val:
        # train/ and test/ but no val/: early stopping and model choice need a validation set,
        # and taking it from test/ would leak; so it comes out of train/, as for a flat folder.
        train = frame["split"] == "train"
        frame.loc[train, "split"] = assign_splits(frame[train], cfg, seed, with_test=False)
        log.info(
            "%s has no val/ folder: %d of its train/ images held out for validation",
            root,
            int((frame["split"] == "val").sum()),
        )
    summary = _summarise(walk, layout, notes, n_other)
    bad = frame[~frame["decodable"]]
    for _, row in bad.head(20).iterrows():
        log.warning("%s: %s", row["relpath"], row["error"])
    log.info(
        "scanned %d files under %s (%d not decodable, %d unchanged since the last scan)",
        len(frame),
        root,
        len(bad),
        from_cache,
    )
    return ScanResult(frame.loc[:, list(MANIFEST_COLUMNS)], summary, from_cache)


def scan_dataset(
    root: Path, cfg: DataConfig, validation: ValidationConfig, seed: int
) -> pd.DataFrame:
    """The manifest alone (columns ``MANIFEST_COLUMNS``), for callers that need no summary."""
    return scan_folder(root, cfg, validation, seed).manifest


def read_manifest(path: Path) -> pd.DataFrame:
    """Load a manifest CSV written by the pipeline, keeping empty strings as strings."""
    text = {
        c: str for c in ("path", "relpath", "label", "split", "sha256", "format", "mode", "error")
    }
    return pd.read_csv(path, keep_default_na=False, dtype=text)
