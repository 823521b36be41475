"""What ``deploy`` and ``serve-schedule --on-new-data`` register, checked with Prefect's own
server-side trigger matching and parameter rendering; and ``deploy``'s refusals."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from uuid import uuid4

import pytest
from prefect.server.events.actions import RunDeployment
from prefect.server.events.schemas.automations import EventTrigger
from prefect.server.events.schemas.events import ReceivedEvent
from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

from components.common.config import PipelineConfig, build_config
from flows.automation import DATASET_UPDATED, dataset_resource, retraining_options
from flows.cli import build_parser

REPO = Path(__file__).resolve().parents[2]


def _event(data: Path, name: str = DATASET_UPDATED) -> ReceivedEvent:
    return ReceivedEvent(
        occurred=datetime.now(UTC),
        event=name,
        resource=dataset_resource(data),
        payload={"digest": "0" * 64},
        id=uuid4(),
    )


def test_the_trigger_runs_on_its_folder_only_and_passes_it_as_data(
    photo_root: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    options = retraining_options(photo_root, PipelineConfig(), "retrain-photos", None, True)
    (trigger,) = options["triggers"]
    server_side = EventTrigger(**trigger.model_dump(include=set(EventTrigger.model_fields)))
    assert server_side.covers(_event(photo_root))
    assert not server_side.covers(_event(other))
    assert not server_side.covers(_event(photo_root, "transfer.dataset.deleted"))

    # the parameters as the server's RunDeployment action renders them for the event
    parameters = copy.deepcopy(trigger.parameters)
    RunDeployment._upgrade_v1_templates(parameters)
    context = HydrationContext(
        raise_on_error=True, render_jinja=True, jinja_context={"event": _event(photo_root)}
    )
    assert hydrate(parameters, context) == {"data": str(photo_root.resolve())}


def test_the_deployment_pins_where_runs_write(
    photo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    cfg = build_config({"output_dir": "runs", "train": {"device": "cpu"}})
    options = retraining_options(photo_root, cfg, "nightly", "0 3 * * 1", False)
    assert options["name"] == "nightly" and options["cron"] == "0 3 * * 1"
    assert options["triggers"] is None
    assert options["parameters"]["data"] == str(photo_root.resolve())
    pinned = PipelineConfig.model_validate(options["parameters"]["config"])
    assert pinned.output_dir == tmp_path / "runs"
    assert pinned.tracking.tracking_uri == "http://127.0.0.1:5999"
    assert pinned.train.device == "cpu"


def test_serve_schedule_and_deploy_take_on_new_data() -> None:
    parser = build_parser()
    args = parser.parse_args(["serve-schedule", "--data", "d", "--on-new-data"])
    assert args.on_new_data and args.cron == "0 3 * * 1"
    args = parser.parse_args(["deploy", "--data", "d", "--cron", "off", "--pool", "p"])
    assert not args.on_new_data and args.pool == "p"


def _deploy(data: Path, tmp_path: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    environ.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONPATH=str(REPO),
        **env,
    )
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "deploy", "--data", str(data), *extra],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("extra", "env", "message"),
    [
        ((), {}, "PREFECT_API_URL is not set"),
        ((), {"PREFECT_API_URL": "http://127.0.0.1:9/api"}, "does not answer"),
        (("--cron", "off"), {}, "nothing would ever start a run"),
    ],
    ids=["no-server", "server-down", "nothing-to-run-it"],
)
def test_deploy_refuses_without_a_server_or_a_reason_to_run(
    photo_root: Path, tmp_path: Path, extra: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    done = _deploy(photo_root, tmp_path, *extra, **env)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
