"""Scanning a labelled image folder into a manifest: one row per file, nothing moved or rewritten.

Two layouts are understood: ``ROOT/<class>/*`` (we make a seeded, stratified split) and
``ROOT/{train,val[,test]}/<class>/*`` (splits kept as given). Every file is read once here to hash
and decode it, so later stages can trust the manifest instead of touching the disk again.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError

from components.common.config import DataConfig, ValidationConfig
from components.common.errors import DataValidationError
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
SPLIT_ALIASES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}


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
    except (OSError, SyntaxError, ValueError) as err:
        return {**row, "decodable": False, "error": f"cannot decode: {err}"}
    return {**row, "decodable": True}


def _is_image(path: Path, extensions: tuple[str, ...]) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in extensions


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _collect(root: Path, cfg: DataConfig) -> tuple[list[tuple[Path, str, str | None]], bool]:
    """(path, label, split or None) for every image file, and whether splits were given."""
    subdirs = {p.name.lower(): p for p in _class_dirs(root)}
    split_dirs = {SPLIT_ALIASES[n]: p for n, p in subdirs.items() if n in SPLIT_ALIASES}
    has_splits = "train" in split_dirs and len(split_dirs) >= 2
    sources = split_dirs.items() if has_splits else [(None, root)]
    found: list[tuple[Path, str, str | None]] = []
    files_per_class: dict[str, int] = {}
    ignored: list[Path] = []
    for split, folder in sources:
        for class_dir in _class_dirs(folder):
            files = [p for p in sorted(class_dir.rglob("*")) if p.is_file()]
            images = [p for p in files if _is_image(p, cfg.extensions)]
            ignored += [p for p in files if p not in images]
            files_per_class[class_dir.name] = files_per_class.get(class_dir.name, 0) + len(images)
            found += [(p, class_dir.name, split) for p in images]
    empty = sorted(c for c, n in files_per_class.items() if n == 0)
    if empty:
        raise DataValidationError(
            f"class folder(s) {', '.join(empty)} under {root} contain no image files; "
            "remove the folder or add images (accepted extensions: "
            f"{', '.join(cfg.extensions)})"
        )
    if ignored:
        shown = ", ".join(str(p.relative_to(root)) for p in ignored[:5])
        log.warning("ignored %d non-image file(s) under %s: %s", len(ignored), root, shown)
    return found, has_splits


def _stable_rank(relpath: str, seed: int) -> str:
    # Split by a hash of the file's path, not its position: new files joining a dataset leave
    # the old files in the split they were in, so test sets stay comparable across retrains.
    return hashlib.sha256(f"{seed}:{relpath}".encode()).hexdigest()


def assign_splits(
    frame: pd.DataFrame, cfg: DataConfig, seed: int, with_test: bool = True
) -> pd.Series:
    """A seeded split, stratified by class, with at least one validation image per class."""
    split = pd.Series("train", index=frame.index)
    test_fraction = cfg.test_fraction if with_test else 0.0
    for _, group in frame.groupby("label"):
        order = group["relpath"].map(lambda r: _stable_rank(r, seed)).sort_values().index
        n = len(order)
        n_val = max(1, round(n * cfg.val_fraction)) if n >= 3 else 0
        n_test = round(n * test_fraction) if n - n_val >= 3 else 0
        split[order[:n_val]] = "val"
        split[order[n_val : n_val + n_test]] = "test"
    return split


def scan_dataset(
    root: Path, cfg: DataConfig, validation: ValidationConfig, seed: int
) -> pd.DataFrame:
    """Walk ``root`` and return the manifest (columns ``MANIFEST_COLUMNS``), reading each file once."""
    root = Path(root)
    if not root.exists():
        raise DataValidationError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DataValidationError(f"dataset path {root} is a file, not a folder of class folders")
    found, has_splits = _collect(root, cfg)
    if not found:
        raise DataValidationError(
            f"no images found under {root}: expected ROOT/<class>/<image> or "
            f"ROOT/train/<class>/<image> with extensions {', '.join(cfg.extensions)}"
        )
    workers = min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        details = list(pool.map(lambda f: inspect_file(f[0], validation.max_image_pixels), found))
    rows = [
        {
            "path": str(p.resolve()),
            "relpath": str(p.relative_to(root)),
            "label": label,
            "split": split or "",
            **detail,
        }
        for (p, label, split), detail in zip(found, details, strict=True)
    ]
    frame = pd.DataFrame(rows)
    if not has_splits:
        frame["split"] = assign_splits(frame, cfg, seed)
    elif not (frame["split"] == "val").any():
        # train/ and test/ but no val/: early stopping and model choice need a validation set,
        # and taking it from test/ would leak; so it comes out of train/, as for a flat folder.
        train = frame["split"] == "train"
        frame.loc[train, "split"] = assign_splits(frame[train], cfg, seed, with_test=False)
        log.info(
            "%s has no val/ folder: %d of its train/ images held out for validation",
            root,
            int((frame["split"] == "val").sum()),
        )
    bad = frame[~frame["decodable"]]
    for _, row in bad.head(20).iterrows():
        log.warning("%s: %s", row["relpath"], row["error"])
    log.info("scanned %d files under %s (%d not decodable)", len(frame), root, len(bad))
    return frame.loc[:, list(MANIFEST_COLUMNS)]


def read_manifest(path: Path) -> pd.DataFrame:
    """Load a manifest CSV written by the pipeline, keeping empty strings as strings."""
    text = {
        c: str for c in ("path", "relpath", "label", "split", "sha256", "format", "mode", "error")
    }
    return pd.read_csv(path, keep_default_na=False, dtype=text)
