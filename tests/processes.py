"""Real server processes for end-to-end tests: started in their own session, followed by PID
through ``/proc`` while they run, and stopped (with everything they started) by the test."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx


def free_port() -> int:
    """A port free on 127.0.0.1 now (a server started right after takes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, is dead)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return fields[0] not in ("Z", "X")


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from the ``children`` lists of its threads."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = {int(c) for c in (task / "children").read_text().split()}
            except (FileNotFoundError, ProcessLookupError):
                continue
            todo.extend(kids - found)
            found |= kids
    return found


def wait_for(
    what: str, check: Callable[[], object], within_s: float, every_s: float = 0.5
) -> object:
    """``check()``'s first truthy answer; fails naming ``what`` after ``within_s``."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if answer := check():
            return answer
        time.sleep(every_s)
    raise AssertionError(f"timed out after {within_s:.0f} s waiting for {what}")


class Service:
    """One command run as a process in its own session; its output goes to ``log``."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], cwd: Path, log: Path):
        self.name, self.log = name, log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.seen: set[int] = {self.proc.pid}
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        while self.proc.poll() is None:
            self.seen |= descendants(self.proc.pid)
            time.sleep(0.1)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def running(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.output}")
        return True

    def wait_http(self, url: str, within_s: float) -> None:
        """Until ``url`` answers 200 (and the process is still running)."""

        def ok() -> bool:
            self.running()
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(url, timeout=2).status_code == 200
            return False

        wait_for(f"{self.name} at {url}", ok, within_s)

    def stop(self, within_s: float = 20.0) -> set[int]:
        """SIGTERM to the session, SIGKILL to what is left after ``within_s``; returns the PIDs
        that were seen and are still alive after that (none, for a clean stop)."""
        self.seen |= descendants(self.proc.pid) if self.proc.poll() is None else set()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            for pid in self.seen - {self.proc.pid}:  # any that left the session
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=within_s)
            deadline = time.monotonic() + within_s
            while {p for p in self.seen if alive(p)} and time.monotonic() < deadline:
                time.sleep(0.1)
            if not {p for p in self.seen if alive(p)}:
                break
        self._out.close()
        return {p for p in self.seen if alive(p)}
