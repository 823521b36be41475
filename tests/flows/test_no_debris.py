"""Nothing outlives the CLI: its Prefect API server dies with it, even after a SIGKILL, and runs
started together get their own servers on distinct ports.

Real processes only: the CLI runs as a subprocess on digits written in the test, and processes
are followed by PID through ``/proc``.
"""

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
import pytest

from components.data.demo_data import materialise_digits

REPO = Path(__file__).resolve().parents[2]
ADDRESS = re.compile(r"temporary Prefect API server on (http://127\.0\.0\.1:\d+)")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)"),
]


def _env(prefect_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONPATH=str(REPO),
        TQDM_DISABLE="1",
    )
    return env


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped by its new parent, is dead)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return fields[0] not in ("Z", "X")


def _descendants(pid: int) -> set[int]:
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


def _survivors(pids: set[int], within_s: float) -> set[int]:
    deadline = time.monotonic() + within_s
    while (left := {p for p in pids if _alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _kill(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class _Cli:
    """One ``python -m flows.cli`` process; its output is read as it comes, and every process it
    starts is recorded while it runs."""

    def __init__(self, args: list[str], cwd: Path, prefect_home: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *args],
            cwd=cwd,
            env=_env(prefect_home),
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
            self.seen |= _descendants(self.proc.pid)
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


def _wait_healthy(address: str, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{address}/api/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{address} never answered")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return materialise_digits(tmp_path_factory.mktemp("digits") / "digits", per_class=12)


def test_sigkill_of_the_cli_takes_its_api_server_with_it(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cli = _Cli(
        ["run", "--data", str(digits), "--output-dir", str(out), "--set", "train.device=cpu"],
        tmp_path,
        tmp_path / "prefect-home",
    )
    try:
        address = cli.api_address(within_s=120)
        _wait_healthy(address, within_s=120)
        children = _descendants(cli.proc.pid) | cli.seen
        assert children, "the API server should be a child process of the CLI"
        cli.proc.send_signal(signal.SIGKILL)
        cli.proc.wait(timeout=10)
        left = _survivors(children, within_s=15)
        assert not left, f"still running after the CLI was killed: {left}\n{cli.output}"
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{address}/api/health", timeout=2)
    finally:
        cli.proc.kill()
        _kill(_descendants(cli.proc.pid) | cli.seen)


def test_two_plans_at_once_in_one_folder_leave_nothing(digits: Path, tmp_path: Path) -> None:
    out, home = tmp_path / "out", tmp_path / "prefect-home"
    args = ["plan", "--data", str(digits), "--output-dir", str(out), "--set", "train.device=cpu"]
    clis = [_Cli(args, tmp_path, home) for _ in range(2)]
    try:
        for cli in clis:
            cli.proc.wait(timeout=480)
        time.sleep(0.2)  # let the readers drain
        for cli in clis:
            assert cli.proc.returncode == 0, cli.output
            assert "Traceback" not in cli.output, cli.output
            assert "address already in use" not in cli.output, cli.output
        addresses = {ADDRESS.search(cli.output).group(1) for cli in clis}  # type: ignore[union-attr]
        assert len(addresses) == 2, addresses
        left = _survivors(set().union(*(cli.seen for cli in clis)), within_s=15)
        assert not left, f"left running after both runs exited 0: {left}"
    finally:
        for cli in clis:
            cli.proc.kill()
            _kill(cli.seen)
