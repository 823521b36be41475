"""Per-class subsets of a labelled folder as hard links (symlinks across file systems), so that a
benchmark can add files to its copy without touching the source.

Imported by the scripts in this folder, which run as ``python benchmarks/<name>.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def class_files(source: Path) -> dict[str, list[Path]]:
    """Every class folder's images, sorted by name (``source/train`` when there is one)."""
    root = source / "train" if (source / "train").is_dir() else source
    return {
        d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for d in sorted(p for p in root.iterdir() if p.is_dir())
    }


def link_range(files: dict[str, list[Path]], dest: Path, start: int, stop: int) -> int:
    """Link images ``start:stop`` of every class into ``dest/<class>/``; returns how many."""
    linked = 0
    for label, paths in files.items():
        (dest / label).mkdir(parents=True, exist_ok=True)
        for src in paths[start:stop]:
            link = dest / label / src.name
            if link.exists():
                continue
            try:
                os.link(src, link)
            except OSError:
                link.symlink_to(src.resolve())
            linked += 1
    return linked
