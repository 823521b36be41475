"""Walking a data folder: what is clutter, which links are followed, and what was skipped.

Operating systems, archivers and notebooks leave entries beside the images (``__MACOSX``,
``Thumbs.db``, ``.ipynb_checkpoints``, dot-files). They are never data, at any depth, so the walk
drops them and counts them for one summary line. A symbolic link is followed only while it stays
inside the data folder (unless the configuration allows more): a link out of it would train on
files nobody put in the dataset. Loops, dangling links and special files are skipped and listed.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from components.common.errors import DataValidationError

# Lower-cased name -> the name the summary uses. Dot-names not listed here count as "hidden".
CLUTTER_NAMES = {
    "__macosx": "__MACOSX",
    "thumbs.db": "Thumbs.db",
    "ehthumbs.db": "Thumbs.db",
    "desktop.ini": "desktop.ini",
    "@eadir": "@eaDir",
    ".ipynb_checkpoints": ".ipynb_checkpoints",
    ".git": ".git",
    "$recycle.bin": "$RECYCLE.BIN",
    "system volume information": "System Volume Information",
}
_EXAMPLES = 20


def clutter_kind(name: str) -> str | None:
    """The clutter category of an entry name, or None when the entry may be data."""
    known = CLUTTER_NAMES.get(name.lower())
    if known is not None:
        return known
    return "hidden" if name.startswith(".") else None


@dataclass(frozen=True)
class Entry:
    """A file or folder as found in the data folder, and where it really is."""

    path: Path  # inside the data folder, links not resolved
    real: Path  # links resolved
    is_dir: bool

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class Skipped:
    """An entry left out of the scan, named by its own path inside the data folder."""

    path: str
    reason: str


class FolderWalk:
    """One walk over one data folder: lists what may be data, counts and records the rest.

    All the bookkeeping lives on the instance, so two scans never share state.
    """

    def __init__(self, root: Path, follow_external_links: bool = False) -> None:
        self.root = Path(root).resolve()
        self.follow_external_links = follow_external_links
        self.clutter: Counter[str] = Counter()
        self.clutter_examples: list[str] = []
        self.skipped: list[Skipped] = []
        self.external_links: list[str] = []
        self._listed: dict[Path, list[Entry]] = {}  # each folder listed (and counted) once

    def top(self) -> Entry:
        """The data folder itself, as an entry to list."""
        return Entry(self.root, self.root, True)

    def relative(self, path: Path) -> str:
        """``path`` relative to the data folder, printable even when its name is not UTF-8."""
        # String work, not ``Path.relative_to``: a scan asks this once per file (60,000 and more).
        text, top = os.fspath(path), os.fspath(self.root)
        prefix = top if top.endswith(os.sep) else top + os.sep
        if text == top:
            return "."
        rel = text[len(prefix) :] if text.startswith(prefix) else str(path.relative_to(self.root))
        return os.fsencode(rel).decode("utf-8", "backslashreplace") or "."

    def entries(self, folder: Entry) -> list[Entry]:
        """``folder``'s children that may be data, sorted by name; the rest counted or recorded."""
        if folder.path in self._listed:
            return self._listed[folder.path]
        try:
            names = sorted(os.listdir(folder.path))
        except OSError as err:
            raise DataValidationError(
                f"cannot list folder {self.relative(folder.path)} under {self.root}: "
                f"{err.strerror or err}"
            ) from None
        found = []
        for name in names:
            entry = self._entry(folder, folder.path / name)
            if entry is not None:
                found.append(entry)
        self._listed[folder.path] = found
        return found

    def files_under(self, folder: Entry, _seen: frozenset[Path] = frozenset()) -> Iterator[Entry]:
        """Every file at any depth under ``folder``; a folder already on the way down is a loop."""
        seen = _seen | {folder.real}
        for entry in self.entries(folder):
            if not entry.is_dir:
                yield entry
            elif entry.real in seen:
                self._skip(entry.path, "symlink loop: leads back to a folder above it")
            else:
                yield from self.files_under(entry, seen)

    def refuse_external_links(self) -> None:
        """Stop the scan when links lead out of the data folder and following them is off."""
        if not self.external_links:
            return
        shown = ", ".join(self.external_links[:_EXAMPLES])
        more = len(self.external_links) - _EXAMPLES
        raise DataValidationError(
            f"{len(self.external_links)} symbolic link(s) under {self.root} lead outside it: "
            f"{shown}{f' and {more} more' if more > 0 else ''}. Links out of the data folder are "
            "not followed; copy the files in, or set data.follow_external_links: true"
        )

    def _entry(self, folder: Entry, path: Path) -> Entry | None:
        name = path.name
        kind = clutter_kind(name)
        if kind is not None:
            self.clutter[kind] += 1
            if len(self.clutter_examples) < _EXAMPLES:
                self.clutter_examples.append(self.relative(path))
            return None
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            self._skip(path, "name is not valid UTF-8; rename it to include it")
            return None
        try:
            info = os.stat(path)
        except OSError as err:
            if err.errno == errno.ELOOP:
                self._skip(path, "symlink loop: the link resolves to itself")
            elif os.path.islink(path):
                self._skip(path, f"dangling symlink (its target {os.readlink(path)} is missing)")
            else:
                self._skip(path, f"cannot be read: {err.strerror or err}")
            return None
        is_dir = stat.S_ISDIR(info.st_mode)
        if not is_dir and not stat.S_ISREG(info.st_mode):
            self._skip(path, "not a regular file (a pipe, socket or device)")
            return None
        if not os.path.islink(path):
            return Entry(path, folder.real / name, is_dir)
        real = Path(os.path.realpath(path))
        if is_dir and (real == folder.real or real in folder.real.parents):
            self._skip(path, "symlink loop: leads back to a folder above it")
            return None
        if not real.is_relative_to(self.root) and not self.follow_external_links:
            self.external_links.append(self.relative(path))
            return None
        return Entry(path, real, is_dir)

    def _skip(self, path: Path, reason: str) -> None:
        self.skipped.append(Skipped(self.relative(path), reason))
