"""What an earlier scan learnt about each file, so a rescan reopens only new or changed files.

Hashing and fully decoding every image is what makes a scan slow (60,000 small PNGs: about a
minute and a half); a ``stat`` is cheap. A file whose path, size, modification time (ns) and inode
all match an earlier scan's is taken to hold the same bytes, so its row is reused as it was
computed. Anything else is read again. The cache is one SQLite file per data folder, rewritten
whole after each scan into a temporary file and moved into place with ``os.replace``: a reader
never sees half a file, two scans racing leave one of their complete files, and files deleted
since the last scan drop out. A cache that cannot be read, or was written by another version or
with another decode limit, is ignored and rebuilt; it never stops a scan.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

# Bumped whenever what ``inspect_file`` computes changes, so old rows are never reused.
CACHE_VERSION = "1"

# The stat identity of a file: (path, size, mtime_ns, inode).
Key = tuple[str, int, int, int]
DETAIL_COLUMNS = ("bytes", "sha256", "format", "width", "height", "mode", "decodable", "error")


def cache_file(cache_dir: Path, root: Path) -> Path:
    """The cache of one data folder under ``cache_dir`` (named by a hash of its resolved path)."""
    name = hashlib.sha256(os.fsencode(Path(root).resolve())).hexdigest()[:16]
    return Path(cache_dir) / "scan" / f"{name}.sqlite"


def file_key(path: Path) -> Key | None:
    """The file's stat identity (links followed), or None when it cannot be stat'ed."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (str(path), info.st_size, info.st_mtime_ns, info.st_ino)


def _salt(max_pixels: int) -> str:
    return f"{CACHE_VERSION}:{max_pixels}"


def load(path: Path, max_pixels: int) -> dict[Key, dict[str, object]]:
    """Rows of an earlier scan by file key; empty when there is none or it cannot be trusted."""
    if not Path(path).is_file():
        return {}
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            salt = db.execute("SELECT value FROM meta WHERE key = 'salt'").fetchone()
            if salt is None or salt[0] != _salt(max_pixels):
                log.info("scan cache %s was written with other settings: rebuilt", path)
                return {}
            rows = db.execute(
                "SELECT path, size, mtime_ns, inode, " + ", ".join(DETAIL_COLUMNS) + " FROM files"
            ).fetchall()
    except sqlite3.Error as err:
        log.warning("scan cache %s cannot be read (%s): ignored and rebuilt", path, err)
        return {}
    found: dict[Key, dict[str, object]] = {}
    for row in rows:
        detail = dict(zip(DETAIL_COLUMNS, row[4:], strict=True))
        detail["decodable"] = bool(detail["decodable"])
        found[(str(row[0]), int(row[1]), int(row[2]), int(row[3]))] = detail
    return found


def save(path: Path, rows: Iterable[tuple[Key, Mapping[str, object]]], max_pixels: int) -> None:
    """Replace the cache at ``path`` with ``rows``, atomically; a failure is logged, not raised."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        with contextlib.closing(sqlite3.connect(tmp)) as db:
            db.execute("PRAGMA journal_mode = OFF")
            db.execute("PRAGMA synchronous = OFF")
            db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
            db.execute("INSERT INTO meta VALUES ('salt', ?)", (_salt(max_pixels),))
            db.execute(
                "CREATE TABLE files (path TEXT, size INTEGER, mtime_ns INTEGER, inode INTEGER, "
                "bytes INTEGER, sha256 TEXT, format TEXT, width INTEGER, height INTEGER, "
                "mode TEXT, decodable INTEGER, error TEXT)"
            )
            db.executemany(
                "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ((*key, *(_plain(detail[c]) for c in DETAIL_COLUMNS)) for key, detail in rows),
            )
            db.commit()
        os.replace(tmp, path)
        tmp = None
    except (OSError, sqlite3.Error) as err:
        log.warning("scan cache %s not written (%s): the next scan reads every file", path, err)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _plain(value: object) -> object:
    """Python scalars for SQLite (numpy integers and booleans are not bound as such)."""
    if isinstance(value, bool):
        return int(value)
    if hasattr(value, "item"):
        return value.item()  # type: ignore[no-any-return, attr-defined]
    return value
