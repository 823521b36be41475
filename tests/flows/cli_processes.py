"""Real CLI processes for the debris tests: output read as it comes, and every process a CLI
starts recorded by PID through ``/proc`` while it runs (Linux)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.processes import alive, descendants

REPO = Path(__file__).resolve().parents[2]
ADDRESS = re.compile(r"temporary Prefect API server on (http://127\.0\.0\.1:\d+)")


def cli_env(prefect_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONPATH=str(REPO),
        TQDM_DISABLE="1",
    )
    return env


def survivors(pids: set[int], within_s: float) -> set[int]:
    deadline = time.monotonic() + within_s
    while (left := {p for p in pids if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Cli:
    """One ``python -m flows.cli`` process; its output is read as it comes, and every process it
    starts is recorded while it runs."""

    def __init__(self, args: list[str], cwd: Path, prefect_home: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *args],
            cwd=cwd,
            env=cli_env(prefect_home),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.seen: set[int] = set()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._watch, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def _watch(self) -> None:
        while self.proc.poll() is None:
            self.seen |= descendants(self.proc.pid)
            time.sleep(0.05)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def api_address(self, within_s: float) -> str:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if match := ADDRESS.search(self.output):
                return match.group(1)
            assert self.proc.poll() is None, self.output
            time.sleep(0.1)
        raise AssertionError(f"no API server announced in {within_s} s:\n{self.output}")


def wait_healthy(address: str, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{address}/api/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{address} never answered")
