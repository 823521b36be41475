"""Which live process owns a run, so that the next run can clear what a killed one left.

A SIGKILL, an OOM kill or a power cut gives a process no chance to close its MLflow run, end its
Prefect flow run or tidy its run folder. Each of those therefore carries the host and PID of the
process that owns it, and the next run on the same host treats one whose owner no longer exists as
abandoned. A PID reused by an unrelated process keeps its run open: the conservative mistake.
Owners on other hosts are never judged: their PIDs mean nothing here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

OWNER_FILE = ".owner.json"  # in a run folder while its run is in progress


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int

    @classmethod
    def current(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid())

    def to_tag(self) -> str:
        """``owner:HOST:PID``, a Prefect tag."""
        return f"owner:{self.host}:{self.pid}"

    @classmethod
    def from_tag(cls, tag: str) -> Owner | None:
        kind, _, rest = tag.partition(":")
        host, _, pid = rest.rpartition(":")
        if kind != "owner" or not host or not pid.isdigit():
            return None
        return cls(host, int(pid))

    def is_gone(self) -> bool:
        """True only when the owner was on this host and no process has its PID any more."""
        return self.host == socket.gethostname() and not pid_alive(self.pid)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_run_folder(run_dir: Path) -> None:
    """Mark ``run_dir`` as this process's run in progress (``release_run_folder`` ends it)."""
    owner = Owner.current()
    (run_dir / OWNER_FILE).write_text(json.dumps({"host": owner.host, "pid": owner.pid}))


def release_run_folder(run_dir: Path) -> None:
    """The run ended (well or with an error it reported): its folder is a record to keep."""
    (run_dir / OWNER_FILE).unlink(missing_ok=True)


def remove_abandoned_run_folders(runs_root: Path) -> list[Path]:
    """Delete the run folders under ``runs_root`` whose owning process died mid-run.

    Only folders this pipeline made and marked are considered (they hold ``OWNER_FILE``); a killed
    run's partial model, manifest and reports describe nothing that exists, and its MLflow and
    Prefect runs are marked killed/crashed by their own reapers.
    """
    removed = []
    for marker in sorted(Path(runs_root).glob(f"*/{OWNER_FILE}")):
        try:
            data = json.loads(marker.read_text())
            owner = Owner(str(data["host"]), int(data["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written, or not ours to judge
        if owner.is_gone():
            shutil.rmtree(marker.parent, ignore_errors=True)
            removed.append(marker.parent)
    if removed:
        logger.info(
            "removed %d run folder(s) left by killed runs: %s",
            len(removed),
            ", ".join(p.name for p in removed),
        )
    return removed
