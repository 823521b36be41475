"""Runs left RUNNING by dead processes are marked KILLED by the next run, in a real SQLite store."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus

from components.common.config import TrackingConfig
from components.deploy import tracking
from components.deploy.stale_runs import OWNER_HOST_TAG, OWNER_PID_TAG
from tests.conftest import dead_pid


def test_the_next_run_kills_runs_of_dead_processes(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    cfg = TrackingConfig(tracking_uri=uri, experiment="stale")
    first = tracking.start_run(cfg, tmp_path, "first", {})  # creates the experiment and store
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_run(first).info.experiment_id
    here = socket.gethostname()

    def orphan(pid: int, host: str) -> str:
        tags = {OWNER_PID_TAG: str(pid), OWNER_HOST_TAG: host}
        return client.create_run(experiment, run_name=f"{pid}@{host}", tags=tags).info.run_id

    dead = orphan(dead_pid(), here)
    pending = client.create_logged_model(experiment, source_run_id=dead, name="model")
    elsewhere = orphan(dead_pid(), f"not-{here}")  # its PID means nothing on this host
    alive = orphan(os.getpid(), here)

    tracking.start_run(cfg, tmp_path, "next", {})

    assert tracking.run_status(dead, tracking_uri=uri) == "KILLED"
    assert client.get_logged_model(pending.model_id).status == LoggedModelStatus.FAILED
    assert tracking.run_status(elsewhere, tracking_uri=uri) == "RUNNING"
    assert tracking.run_status(alive, tracking_uri=uri) == "RUNNING"
    assert tracking.run_status(first, tracking_uri=uri) == "RUNNING"  # this process owns it
    tags = client.get_run(first).data.tags
    assert tags[OWNER_PID_TAG] == str(os.getpid()) and tags[OWNER_HOST_TAG] == here
