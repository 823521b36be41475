"""Watching a data folder: one batch of changes per burst of activity, fingerprinted.

Copying 10,000 images into a folder is 10,000 file events (more, as each file is written in
pieces), and a half-copied folder is not a dataset. The watcher therefore waits until the folder
has been quiet for ``quiet_s`` seconds, then compares what the folder holds with what it held
after the last batch. The comparison, not the raw events, is what a batch reports: a file created
and deleted within one burst is no change, and an event the watcher missed (a folder created
before its watch was set) is still found.

What may be data is decided as the scan decides it (``FolderWalk``): clutter and hidden files are
never data, so a copy tool's hidden temporary files and a ``.DS_Store`` are ignored.

A file counts as changed when its size or modification time changed, so touching a file is a
change (the batch is reported) though its content is the same: the ``digest`` says what the
content is, the path and sha256 of every file, so equal digests mean equal data. Whether a change
is worth training on is left to the run, whose fingerprint decides that for the same data.

Inotify does not see changes made by other machines on NFS, SMB, sshfs and the like: on such a
file system, or when asked, the folder is polled instead.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from components.common.errors import DataValidationError
from components.data.tree import FolderWalk, clutter_kind

# File systems where inotify misses changes made elsewhere (or is not implemented at all).
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "afs",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "fuse.sshfs",
        "fuse.rclone",
        "fuse.s3fs",
        "fuse.gcsfuse",
        "fuse.juicefs",
        "virtiofs",
        "vboxsf",
        "davfs",
        "fuse.davfs",
    }
)
_EXAMPLES = 50  # names per list in an event payload; the counts are always complete


@dataclass(frozen=True)
class FileState:
    """What says a file changed without reading it."""

    size: int
    mtime_ns: int
    inode: int


@dataclass(frozen=True)
class Changes:
    """One batch: what changed since the previous batch, and the folder's content digest now."""

    root: str
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    digest: str  # sha256 over (path, sha256 of content) of every file that may be data
    files: int

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def to_payload(self) -> dict[str, object]:
        """JSON for an event: the digest, counts, and up to 50 paths of each kind."""
        return {
            "data": self.root,
            "digest": self.digest,
            "files": self.files,
            "counts": {
                "added": len(self.added),
                "removed": len(self.removed),
                "changed": len(self.changed),
            },
            "added": list(self.added[:_EXAMPLES]),
            "removed": list(self.removed[:_EXAMPLES]),
            "changed": list(self.changed[:_EXAMPLES]),
        }


def needs_polling(root: Path, mounts: Path = Path("/proc/self/mounts")) -> bool:
    """True when ``root`` lies on a network or FUSE file system that inotify cannot watch."""
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return False  # not Linux: the native watcher (FSEvents, ReadDirectoryChangesW) works
    real = os.path.realpath(root)
    best, fstype = "", ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, fstype = point, fields[2]
    return fstype in NETWORK_FILESYSTEMS


def take_snapshot(root: Path, follow_external_links: bool = False) -> dict[str, FileState]:
    """Every file under ``root`` that may be data, by its path inside ``root``."""
    walk = FolderWalk(root, follow_external_links)
    found: dict[str, FileState] = {}
    for entry in walk.files_under(walk.top()):
        try:
            info = os.stat(entry.path)
        except OSError:
            continue  # removed while the folder was listed: the next batch sees it gone
        found[walk.relative(entry.path)] = FileState(info.st_size, info.st_mtime_ns, info.st_ino)
    return found


class ContentDigest:
    """The folder's content digest, re-reading only files whose ``FileState`` changed."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self._known: dict[str, tuple[FileState, str]] = {}

    def __call__(self, snapshot: dict[str, FileState]) -> str:
        total = hashlib.sha256()
        known: dict[str, tuple[FileState, str]] = {}
        for rel in sorted(snapshot):
            state = snapshot[rel]
            cached = self._known.get(rel)
            sha = cached[1] if cached and cached[0] == state else self._sha256(rel)
            if sha is None:
                continue
            known[rel] = (state, sha)
            total.update(f"{rel}\0{sha}\n".encode())
        self._known = known
        return total.hexdigest()

    def _sha256(self, rel: str) -> str | None:
        h = hashlib.sha256()
        try:
            with open(self.root / rel, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
        except OSError:
            return None
        return h.hexdigest()


def compare(
    root: Path, before: dict[str, FileState], after: dict[str, FileState], digest: str
) -> Changes:
    """The batch that takes ``before`` to ``after``."""
    added = tuple(sorted(after.keys() - before.keys()))
    removed = tuple(sorted(before.keys() - after.keys()))
    changed = tuple(
        sorted(
            p
            for p in after.keys() & before.keys()
            if (after[p].size, after[p].mtime_ns) != (before[p].size, before[p].mtime_ns)
        )
    )
    return Changes(str(root), added, removed, changed, digest, len(after))


class FolderWatcher:
    """Batches of changes to one data folder, each reported once the folder is quiet."""

    def __init__(
        self,
        root: Path,
        quiet_s: float = 5.0,
        polling: bool | None = None,
        poll_interval_s: float = 1.0,
        follow_external_links: bool = False,
    ) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise DataValidationError(f"--data {root} is not a folder")
        self.quiet_s = quiet_s
        self.polling = needs_polling(self.root) if polling is None else polling
        self.poll_interval_s = poll_interval_s
        self.follow_external_links = follow_external_links
        self._digest = ContentDigest(self.root)
        self._last = take_snapshot(self.root, follow_external_links)
        self.digest = self._digest(self._last)  # of the folder as the watch began

    def _may_be_data(self, _change: object, path: str) -> bool:
        rel = os.path.relpath(path, self.root)
        return not any(clutter_kind(part) for part in Path(rel).parts if part != "..")

    def check(self) -> Changes:
        """Compare the folder with the last batch now, and make this the new reference."""
        now = take_snapshot(self.root, self.follow_external_links)
        self.digest = self._digest(now)
        batch = compare(self.root, self._last, now, self.digest)
        self._last = now
        return batch

    def batches(self, stop: threading.Event | None = None) -> Iterator[Changes]:
        """Each non-empty batch of changes, ``quiet_s`` after the last file event of a burst,
        until ``stop`` is set."""
        import watchfiles  # imported here: only the watch command needs it

        tick_ms = max(50, int(min(self.quiet_s / 2, 1.0) * 1000))
        pending, last_event = False, 0.0
        for raw in watchfiles.watch(
            self.root,
            watch_filter=self._may_be_data,
            debounce=tick_ms,
            step=50,
            stop_event=stop,
            rust_timeout=tick_ms,
            yield_on_timeout=True,
            raise_interrupt=False,
            force_polling=self.polling,
            poll_delay_ms=int(self.poll_interval_s * 1000),
            recursive=True,
        ):
            now = time.monotonic()
            if raw:
                pending, last_event = True, now
                continue
            if pending and now - last_event >= self.quiet_s:
                pending = False
                batch = self.check()
                if batch:
                    yield batch
