"""Where a fine-tune keeps its epoch checkpoints: a folder named for what it trains, not for the run.

A run folder is new for every run, so a checkpoint inside it helps only a retry within the same
process. Named for the data and the training configuration instead
(``output_dir/checkpoints/<key>/``), the checkpoint of a fine-tune killed mid-way is found by the
next run on the same data with the same configuration, which resumes after the last finished
epoch. A successful run removes its own folder (the model is saved; nothing is left to resume),
and folders no run has touched for ``STALE_AFTER_S`` are removed as debris of runs that never came
back.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STALE_AFTER_S = 7 * 24 * 3600.0


def checkpoint_key(data_digest: str, settings: Mapping[str, Any]) -> str:
    """16 hex characters of sha256 over the data digest and the settings that shape the training."""
    text = json.dumps({"data": data_digest, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_dir(output_dir: Path, key: str) -> Path:
    """``output_dir/checkpoints/<key>``, resolved (created by the first checkpoint written)."""
    return (Path(output_dir) / "checkpoints" / key).resolve()


@contextmanager
def exclusive(folder: Path | None) -> Iterator[None]:
    """One fine-tune at a time per checkpoint folder.

    Two runs with the same data and configuration share the folder; writing it together they
    would interleave epochs. The second waits on ``<key>.lock`` beside the folder (a lock, not a
    file's presence, so a killed holder frees it at once), then resumes from the first's last
    checkpoint instead of training again. ``None`` (a run-folder checkpoint) needs no lock.
    """
    if folder is None:
        yield
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another run is fine-tuning on this data and configuration: waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _last_touched(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.rglob("*")), default=folder.stat().st_mtime)


def clean_checkpoints(
    output_dir: Path, finished: str | None, stale_after_s: float = STALE_AFTER_S
) -> list[Path]:
    """Remove the folder of the ``finished`` key and every other one idle for ``stale_after_s``;
    returns what was removed. A folder touched recently may belong to a run still going."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    now, removed = time.time(), []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name == finished or now - _last_touched(folder) > stale_after_s:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        log.info("removed %d checkpoint folder(s) under %s", len(removed), root)
    return removed
