"""Retraining that runs itself, end to end, with real processes only: ``prefect server start``,
``mlflow server``, a process work pool and its worker, ``deploy --on-new-data`` and ``watch``.

New images in the watched folder make exactly one event, one flow run on the worker and a new
registered version; touching a file makes a second event, whose run is skipped (same data digest,
configuration and backbone) and registers nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from components.data.demo_data import materialise_digits
from flows.automation import DATASET_UPDATED, dataset_resource
from tests.processes import Service, free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
POOL = "retrain-pool"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="follows PIDs in /proc"),
]


def _env(tmp_path: Path, api: str, tracking: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_API_URL=api,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="2",
        MLFLOW_TRACKING_URI=tracking,
        MLFLOW_DISABLE_TELEMETRY="true",
        PYTHONPATH=str(REPO),
        TQDM_DISABLE="1",
    )
    return env


def _post(api: str, route: str, body: dict[str, Any]) -> Any:
    answer = httpx.post(f"{api}/{route}", json=body, timeout=30)
    answer.raise_for_status()
    return answer.json()


def _events(api: str, resource_id: str) -> list[dict[str, Any]]:
    found = _post(
        api,
        "events/filter",
        {
            "filter": {
                "event": {"name": [DATASET_UPDATED]},
                "resource": {"id": [resource_id]},
                "occurred": {"since": "2000-01-01T00:00:00Z"},
            },
            "limit": 50,
        },
    )
    return found["events"]


def _runs(api: str, deployment_id: str) -> list[dict[str, Any]]:
    return _post(api, "flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})


def _finished(api: str, deployment_id: str, count: int) -> list[dict[str, Any]] | None:
    runs = _runs(api, deployment_id)
    done = [r for r in runs if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]
    return runs if len(done) >= count else None


def _logs(api: str, flow_run_id: str) -> str:
    logs = _post(
        api, "logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}
    )
    return "\n".join(entry["message"] for entry in logs)


def _versions(tracking: str, name: str) -> list[int]:
    from mlflow import MlflowClient

    found = MlflowClient(tracking_uri=tracking).search_model_versions(f"name='{name}'")
    return sorted(int(v.version) for v in found)


def test_new_images_retrain_once_and_a_touch_is_skipped(tmp_path: Path) -> None:
    prefect_port, mlflow_port = free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    tracking = f"http://127.0.0.1:{mlflow_port}"
    env = _env(tmp_path, api, tracking)
    data = materialise_digits(tmp_path / "digits", per_class=10)
    services: list[Service] = []

    def start(name: str, *args: str) -> Service:
        services.append(Service(name, list(args), env, REPO, tmp_path / f"{name}.log"))
        return services[-1]

    try:
        prefect = start(
            "prefect-server",
            str(BIN / "prefect"),
            *("server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)),
        )
        mlflow = start(
            "mlflow-server",
            str(BIN / "mlflow"),
            "server",
            *("--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"),
            *("--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"),
            *("--artifacts-destination", str(tmp_path / "mlflow-artifacts")),
        )
        prefect.wait_http(f"{api}/health", within_s=180)
        mlflow.wait_http(f"{tracking}/health", within_s=180)
        deploy = [sys.executable, "-m", "flows.cli", "deploy", "--data", str(data), "--pool", POOL]
        missing = subprocess.run(
            deploy, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert missing.returncode == 2 and f"no work pool {POOL!r}" in missing.stderr
        subprocess.run(
            [str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process"],
            env=env,
            cwd=tmp_path,
            check=True,
            capture_output=True,
            timeout=120,
        )
        worker = start("worker", str(BIN / "prefect"), "worker", "start", "--pool", POOL)
        worker.running()

        settings = [
            *("--set", "train.device=cpu", "--set", "train.num_workers=0"),
            *("--set", "strategy.case=1", "--set", "strategy.verify=off"),
            *("--set", "similarity.sample_size=32", "--set", "similarity.bootstrap_rounds=50"),
        ]
        args = ["--on-new-data", "--cron", "off", "--output-dir", str(tmp_path / "out"), *settings]
        deployed = subprocess.run(
            [*deploy, *args],
            env=env,
            cwd=tmp_path,  # the deployment must not depend on where it was made
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert deployed.returncode == 0, deployed.stderr
        deployment_id = deployed.stdout.split("(", 1)[1].split(")", 1)[0]
        watch = start(
            "watch",
            *(sys.executable, "-m", "flows.cli", "watch", "--data", str(data), "--quiet", "2"),
        )
        wait_for("the watcher", lambda: watch.running() and "watching" in watch.output, 120)
        resource = dataset_resource(data)["prefect.resource.id"]

        materialise_digits(data, per_class=12)  # two more images of each digit
        first = wait_for("the first run", lambda: _finished(api, deployment_id, 1), 900)
        assert len(first) == 1 and first[0]["state_type"] == "COMPLETED", _logs(api, first[0]["id"])
        assert first[0]["work_pool_name"] == POOL
        assert first[0]["parameters"]["data"] == str(data.resolve())
        events = _events(api, resource)
        assert len(events) == 1
        assert events[0]["payload"]["counts"] == {"added": 20, "removed": 0, "changed": 0}
        assert _versions(tracking, "digits") == [1]

        (data / "3" / "0001.png").touch()  # no real change: same bytes, a new mtime
        runs = wait_for("the second run", lambda: _finished(api, deployment_id, 2), 600)
        assert len(runs) == 2 and all(r["state_type"] == "COMPLETED" for r in runs)
        second = next(r for r in runs if r["id"] != first[0]["id"])
        # the run's last logs may reach the server just after its state does
        wait_for("the skip", lambda: "unchanged since run" in _logs(api, second["id"]), 60)
        events = _events(api, resource)
        assert len(events) == 2
        assert len({e["payload"]["digest"] for e in events}) == 1  # the same content
        assert any(e["payload"]["changed"] == ["3/0001.png"] for e in events)
        assert _versions(tracking, "digits") == [1]
    finally:
        left: set[int] = set()
        for service in reversed(services):
            left |= service.stop()
        assert not left, f"still running: {left}"
