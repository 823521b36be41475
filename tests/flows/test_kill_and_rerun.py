"""A run SIGKILLed at any stage leaves nothing behind that the next run does not clear.

One data folder and one output folder; a real ``run`` CLI process is killed four times, in the
embedding, mid fine-tune (after its first checkpoint), at the export and inside registration,
then a fifth run completes. After every kill no process of the CLI survives (by PID, through
``/proc``); at the end the Prefect database has no run left RUNNING, MLflow has no RUNNING run nor
PENDING logged model, the fine-tune was resumed from the killed run's checkpoint, the aliases
point at a finished run's version, and only the finished run's folder remains.
"""

from __future__ import annotations

import re
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus, ViewType

from components.data.demo_data import materialise_digits
from tests.flows.cli_processes import ADDRESS, Cli, descendants, kill_all, survivors

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)"),
]

# Case 3 (a fine-tune) at 64 px: every stage runs, each within seconds on a CPU.
SETTINGS = [
    "--case", "3",
    "--set", "train.device=cpu",
    "--set", "train.image_size=64",
    "--set", "train.finetune_epochs=3",
    "--set", "similarity.sample_size=16",
    "--set", "similarity.bootstrap_rounds=20",
]  # fmt: skip
RESUMED = re.compile(r"resuming fine-tuning from checkpoint \S+ after epoch (\d+)")


def _wait_for(cli: Cli, what: str, ready: Callable[[], bool], within_s: float = 600) -> None:
    deadline = time.monotonic() + within_s
    while not ready():
        assert cli.proc.poll() is None, f"exited before {what}:\n{cli.output}"
        assert time.monotonic() < deadline, f"no {what} in {within_s} s:\n{cli.output}"
        time.sleep(0.05)


def _kill_when(cli: Cli, what: str, ready: Callable[[], bool]) -> str:
    """SIGKILL ``cli`` as soon as ``ready``; assert that none of its processes outlive it."""
    try:
        _wait_for(cli, what, ready)
        children = descendants(cli.proc.pid) | cli.seen
        cli.proc.send_signal(signal.SIGKILL)
        cli.proc.wait(timeout=10)
        left = survivors(children, within_s=15)
        assert not left, f"still running after a SIGKILL at {what}: {left}\n{cli.output}"
        assert ADDRESS.search(cli.output), cli.output
        return cli.output
    finally:
        cli.proc.kill()
        kill_all(descendants(cli.proc.pid) | cli.seen)


def test_kills_at_every_stage_then_a_rerun_that_recovers(tmp_path: Path) -> None:
    data = materialise_digits(tmp_path / "digits", per_class=12)
    out, home = tmp_path / "out", tmp_path / "prefect-home"
    args = ["run", "--data", str(data), "--output-dir", str(out), *SETTINGS]

    def start() -> Cli:
        return Cli(args, tmp_path, home)

    def says(pattern: str) -> Callable[[], bool]:
        return lambda: re.search(pattern, cli.output) is not None

    cli = start()  # 1: in the embedding (the engine starts computing the split's rows)
    _kill_when(cli, "embedding", says(r"engine: \d+ images at 64 px, \d+ to compute \(0 with"))

    cli = start()  # 2: mid fine-tune, once the first epoch's checkpoint is on disk
    _kill_when(cli, "fine-tune", lambda: any((out / "checkpoints").glob("*/*.pt")))

    cli = start()  # 3: at the export, right after the evaluation
    killed_at_export = _kill_when(cli, "export", says(r"test accuracy \d"))
    resumed = RESUMED.search(killed_at_export)
    assert resumed, f"the fine-tune was not resumed:\n{killed_at_export}"
    assert 0 <= int(resumed.group(1)) < 2  # epochs count from 0: some epoch before the last

    cli = start()  # 4: inside registration, once its MLflow run exists
    _kill_when(cli, "registration", says(r"MLflow run \w+ \(digits\) in "))
    uri = f"sqlite:///{out / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    left_running = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="attributes.status = 'RUNNING'",
    )
    assert len(left_running) == 1  # the killed registration's, until the next run

    cli = start()  # 5: the run that recovers
    assert cli.proc.wait(timeout=600) == 0, cli.output
    time.sleep(0.2)  # let the reader drain
    assert "registered models:/digits/" in cli.output, cli.output
    assert RESUMED.search(cli.output), cli.output  # the finished fine-tune's last checkpoint

    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, run_view_type=ViewType.ALL)
    status = {r.info.run_id: r.info.status for r in runs}
    assert "RUNNING" not in status.values(), status
    assert status[left_running[0].info.run_id] == "KILLED"
    models = client.search_logged_models(experiments)
    assert all(m.status != LoggedModelStatus.PENDING for m in models), models
    for alias in ("champion", "challenger"):
        version = client.get_model_version_by_alias("digits", alias)
        assert version.status == "READY" and status[version.run_id] == "FINISHED", (alias, version)

    with sqlite3.connect(home / "prefect.db") as db:
        states = sorted(row[0] for row in db.execute("SELECT state_type FROM flow_run"))
    assert states == ["COMPLETED"] + ["CRASHED"] * 4, states

    folders = list((out / "runs").iterdir())
    assert len(folders) == 1 and not (folders[0] / ".owner.json").exists(), folders
    assert not any((out / "checkpoints").glob("*/*")), list((out / "checkpoints").rglob("*"))
