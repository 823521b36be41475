"""The folder watcher on real files: one batch per burst, polling, touches, additions, removals."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from components.common.errors import DataValidationError
from components.data.watching import Changes, FolderWatcher, needs_polling


@contextmanager
def watching(watcher: FolderWatcher) -> Iterator[list[Changes]]:
    """The batches ``watcher`` reports while the block runs (and shortly after it)."""
    batches: list[Changes] = []
    stop = threading.Event()
    thread = threading.Thread(target=lambda: batches.extend(watcher.batches(stop)), daemon=True)
    thread.start()
    time.sleep(0.5)  # the watch is set before anything changes
    try:
        yield batches
    finally:
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive()


def _until(check: Callable[[], bool], within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _folder(tmp_path: Path, n: int = 3) -> Path:
    root = tmp_path / "data"
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(n):
            (root / label / f"{i}.png").write_bytes(f"{label}{i}".encode())
    return root


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_a_copy_in_many_steps_is_one_batch(tmp_path: Path, polling: bool) -> None:
    root = _folder(tmp_path)
    source = tmp_path / "incoming"
    source.mkdir()
    for i in range(400):
        (source / f"{i}.png").write_bytes(os.urandom(64 + i))
    watcher = FolderWatcher(root, quiet_s=1.5, polling=polling, poll_interval_s=0.2)
    with watching(watcher) as batches:
        (root / "bird").mkdir()
        for i, path in enumerate(sorted(source.iterdir())):
            shutil.copyfile(path, root / "bird" / path.name)
            if i % 100 == 99:
                time.sleep(0.5)  # pauses shorter than the quiet period: still the same copy
        _until(lambda: len(batches) >= 1)
        time.sleep(2.5)  # nothing more is coming
    assert len(batches) == 1
    batch = batches[0]
    assert len(batch.added) == 400 and all(p.startswith("bird/") for p in batch.added)
    assert batch.removed == () and batch.changed == ()
    assert batch.files == 406 and batch.digest == watcher.digest
    assert batch.to_payload()["counts"] == {"added": 400, "removed": 0, "changed": 0}
    assert len(batch.to_payload()["added"]) == 50  # examples only; the counts are complete


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_a_touch_is_a_change_with_the_same_content_digest(tmp_path: Path, polling: bool) -> None:
    root = _folder(tmp_path)
    watcher = FolderWatcher(root, quiet_s=0.5, polling=polling, poll_interval_s=0.2)
    before = watcher.digest
    with watching(watcher) as batches:
        later = time.time() + 5
        os.utime(root / "cat" / "1.png", (later, later))
        _until(lambda: len(batches) == 1)
    assert batches[0].changed == ("cat/1.png",) and not batches[0].added
    assert batches[0].digest == before


def test_added_removed_and_changed_files_are_listed(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    watcher = FolderWatcher(root, quiet_s=0.5, polling=False)
    before = watcher.digest
    with watching(watcher) as batches:
        (root / "cat" / "0.png").unlink()
        (root / "dog" / "9.png").write_bytes(b"new")
        (root / "dog" / "1.png").write_bytes(b"other bytes")
        _until(lambda: len(batches) == 1)
    batch = batches[0]
    assert (batch.added, batch.removed, batch.changed) == (
        ("dog/9.png",),
        ("cat/0.png",),
        ("dog/1.png",),
    )
    assert batch.digest != before and batch.files == 6


def test_clutter_and_changes_undone_within_a_burst_make_no_batch(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    watcher = FolderWatcher(root, quiet_s=0.5, polling=False)
    with watching(watcher) as batches:
        (root / ".DS_Store").write_bytes(b"finder")
        (root / "cat" / ".0.png.partial").write_bytes(b"half a copy")
        (root / "dog" / "tmp.png").write_bytes(b"gone soon")
        (root / "dog" / "tmp.png").unlink()
        time.sleep(2.0)
        assert batches == []
        (root / "dog" / "real.png").write_bytes(b"kept")
        _until(lambda: len(batches) == 1)
    assert batches[0].added == ("dog/real.png",)


def test_a_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="not a folder"):
        FolderWatcher(tmp_path / "nowhere")


def test_network_file_systems_are_polled(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/sda1 / ext4 rw 0 0\n"
        "server:/export /mnt/data nfs4 rw 0 0\n"
        "//nas/share /mnt/nas\\040box cifs rw 0 0\n"
    )
    assert needs_polling(Path("/mnt/data/cats"), mounts)
    assert needs_polling(Path("/mnt/nas box/x"), mounts)
    assert not needs_polling(Path("/mnt/database"), mounts)  # a sibling, not inside /mnt/data
    assert not needs_polling(Path("/home/me/data"), mounts)
    assert not needs_polling(tmp_path, tmp_path / "no-such-file")
