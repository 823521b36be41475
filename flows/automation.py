"""Retraining that runs itself: deployments on a Prefect server, and the event that new data sends.

``watch`` turns each quiet-after-a-burst batch of changes to a data folder into one
``transfer.dataset.updated`` event whose resource is that folder. A deployment made with
``--on-new-data`` carries a trigger that matches that event for that folder only and runs the
flow with the folder (read from the event) as ``data``. Whether the run then trains is the flow's
decision: unchanged data, configuration and backbone end it early with ``skipped: true``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
from prefect.events import DeploymentEventTrigger, Event, emit_event
from prefect.events.worker import EventsWorker
from prefect.settings import PREFECT_API_URL

from components.common.config import PipelineConfig
from components.common.errors import PipelineError
from components.data.naming import dataset_name
from components.data.watching import Changes
from components.deploy.tracking import resolve_tracking_uri

DATASET_UPDATED = "transfer.dataset.updated"
PATH_LABEL = "transfer.dataset.path"  # the folder, as a label of the event's resource
REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/transfer.py:transfer_flow"
# What the CLI sets for itself at import, set for the flow run process a worker starts.
RUN_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "components",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


def dataset_resource(data: Path) -> dict[str, str]:
    """The event resource that stands for one data folder (absolute, links resolved)."""
    folder = str(Path(data).resolve())
    return {
        "prefect.resource.id": f"transfer.dataset.{folder}",
        "prefect.resource.name": dataset_name(Path(folder), None),
        PATH_LABEL: folder,
    }


def new_data_trigger(data: Path, name: str) -> DeploymentEventTrigger:
    """Run the deployment on each ``transfer.dataset.updated`` event of this folder, with the
    folder the event names as ``data`` (the other parameters stay the deployment's)."""
    return DeploymentEventTrigger(
        name=f"{name}: new data",
        description=f"retrain when {Path(data).resolve()} changes",
        expect={DATASET_UPDATED},
        match={"prefect.resource.id": dataset_resource(data)["prefect.resource.id"]},
        parameters={"data": "{{ event.resource['" + PATH_LABEL + "'] }}"},
    )


def pinned_config(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with the output folder absolute and the tracking URI resolved now, so a run
    started later, elsewhere (a worker's process, another working directory, another
    ``MLFLOW_TRACKING_URI``) writes where this command would have."""
    out = Path(cfg.output_dir).resolve()
    uri = resolve_tracking_uri(cfg.tracking, out)
    return cfg.model_copy(
        update={
            "output_dir": out,
            "tracking": cfg.tracking.model_copy(update={"tracking_uri": uri}),
        }
    )


def retraining_options(
    data: Path, cfg: PipelineConfig, name: str, cron: str | None, on_new_data: bool
) -> dict[str, Any]:
    """What ``serve`` and ``deploy`` are given: the parameters, the schedule and the trigger."""
    options: dict[str, Any] = {
        "name": name,
        "parameters": {
            "data": str(Path(data).resolve()),
            "config": pinned_config(cfg).model_dump(mode="json"),
        },
        "cron": cron,
        "triggers": [new_data_trigger(data, name)] if on_new_data else None,
    }
    return options


def require_api(timeout_s: float = 10.0) -> str:
    """The Prefect server's API URL, once it has answered; a ``PipelineError`` otherwise."""
    url = PREFECT_API_URL.value()
    if not url:
        raise PipelineError(
            "PREFECT_API_URL is not set: deployments and events need a Prefect server. Start one "
            "(prefect server start) and export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    try:
        answer = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout_s)
        answer.raise_for_status()
    except httpx.HTTPError as err:
        raise PipelineError(
            f"the Prefect server at PREFECT_API_URL={url} does not answer ({err}); "
            "is `prefect server start` running?"
        ) from None
    return url


def deploy_retraining(
    data: Path,
    cfg: PipelineConfig,
    name: str,
    pool: str,
    cron: str | None,
    on_new_data: bool,
) -> UUID:
    """Register the flow, from this checkout's source, as a deployment on a work pool; a
    ``prefect worker start --pool POOL`` started from this project's environment runs it."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.flows import Flow

    try:  # before loading the flow, which takes seconds
        with get_client(sync_client=True) as client:
            client.read_work_pool(pool)
    except ObjectNotFound:
        raise PipelineError(
            f"no work pool {pool!r} on {PREFECT_API_URL.value()}: create it with "
            f"`prefect work-pool create {pool} --type process`"
        ) from None
    options = retraining_options(data, cfg, name, cron, on_new_data)
    flow = Flow.from_source(source=str(REPO), entrypoint=ENTRYPOINT)
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**RUN_ENV, "PYTHONPATH": pythonpath}
    return flow.deploy(
        **options,
        work_pool_name=pool,
        job_variables={"env": env, "working_dir": str(REPO)},
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,
    )


def emit_dataset_updated(changes: Changes, timeout_s: float = 30.0) -> Event | None:
    """Send one ``transfer.dataset.updated`` event for a batch, and wait until it has been sent."""
    event = emit_event(
        event=DATASET_UPDATED,
        resource=dataset_resource(Path(changes.root)),
        payload=changes.to_payload(),
    )
    EventsWorker.drain_all(timeout=timeout_s)  # the next emit starts a fresh worker
    return event
