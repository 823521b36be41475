"""Nothing outlives the CLI: its Prefect API server dies with it, even after a SIGKILL, and runs
started together get their own servers on distinct ports.

Real processes only: the CLI runs as a subprocess on digits written in the test, and processes
are followed by PID through ``/proc``.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest

from components.data.demo_data import materialise_digits
from tests.flows.cli_processes import (
    ADDRESS,
    Cli,
    descendants,
    kill_all,
    survivors,
    wait_healthy,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)"),
]


CHEAP_PLAN = [
    "--set", "train.device=cpu",
    "--set", "strategy.verify=off",
    "--set", "strategy.resolution=rule",
    "--set", "similarity.sample_size=16",
    "--set", "similarity.bootstrap_rounds=20",
]  # fmt: skip


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return materialise_digits(tmp_path_factory.mktemp("digits") / "digits", per_class=12)


def test_sigkill_of_the_cli_takes_its_api_server_with_it(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cli = Cli(
        ["run", "--data", str(digits), "--output-dir", str(out), "--set", "train.device=cpu"],
        tmp_path,
        tmp_path / "prefect-home",
    )
    try:
        address = cli.api_address(within_s=120)
        wait_healthy(address, within_s=120)
        children = descendants(cli.proc.pid) | cli.seen
        assert children, "the API server should be a child process of the CLI"
        cli.proc.send_signal(signal.SIGKILL)
        cli.proc.wait(timeout=10)
        left = survivors(children, within_s=15)
        assert not left, f"still running after the CLI was killed: {left}\n{cli.output}"
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{address}/api/health", timeout=2)
    finally:
        cli.proc.kill()
        kill_all(descendants(cli.proc.pid) | cli.seen)


def test_two_plans_at_once_in_one_folder_leave_nothing(digits: Path, tmp_path: Path) -> None:
    out, home = tmp_path / "out", tmp_path / "prefect-home"
    # The plan's work is beside the point here (servers and ports are), so it is kept small.
    args = ["plan", "--data", str(digits), "--output-dir", str(out), *CHEAP_PLAN]
    clis = [Cli(args, tmp_path, home) for _ in range(2)]
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
        left = survivors(set().union(*(cli.seen for cli in clis)), within_s=15)
        assert not left, f"left running after both runs exited 0: {left}"
    finally:
        for cli in clis:
            cli.proc.kill()
            kill_all(cli.seen)
