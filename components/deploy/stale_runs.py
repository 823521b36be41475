"""MLflow runs left RUNNING by a process of this pipeline that died (SIGKILL, OOM, power loss).

A dead process never closes its run, so the store would show it RUNNING for ever, and its logged
model PENDING. Every run this pipeline starts carries the PID and host of the process that owns it
(``owner_tags``); a later run on the same host looks for RUNNING runs whose owner no longer
exists, marks them KILLED and their PENDING logged models FAILED. Runs of other hosts are left
alone: their PIDs mean nothing here. A PID reused by an unrelated process keeps its run RUNNING,
the conservative mistake.
"""

from __future__ import annotations

import logging
import socket

from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus, ViewType

from components.common.ownership import Owner

logger = logging.getLogger(__name__)

OWNER_PID_TAG = "transfer_pipeline.pid"
OWNER_HOST_TAG = "transfer_pipeline.host"


def owner_tags() -> dict[str, str]:
    """The tags that name this process as a run's owner."""
    owner = Owner.current()
    return {OWNER_PID_TAG: str(owner.pid), OWNER_HOST_TAG: owner.host}


def reap_stale_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of ``experiment_id`` owned by a dead process of this host, and
    FAILED their PENDING logged models; returns the ids of the runs marked."""
    host = socket.gethostname()
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' AND tags.`{OWNER_HOST_TAG}` = '{host}'",
        run_view_type=ViewType.ACTIVE_ONLY,
    )
    stale = []
    for run in runs:
        pid = run.data.tags.get(OWNER_PID_TAG, "")
        if pid.isdigit() and Owner(host, int(pid)).is_gone():
            client.set_terminated(run.info.run_id, status="KILLED")
            stale.append(run.info.run_id)
    if stale:
        _fail_pending_models(client, experiment_id, set(stale))
        logger.info("marked %d MLflow run(s) of dead processes KILLED: %s", len(stale), stale)
    return stale


def _fail_pending_models(client: MlflowClient, experiment_id: str, run_ids: set[str]) -> None:
    token = None
    while True:
        page = client.search_logged_models([experiment_id], page_token=token)
        for model in page:
            if model.source_run_id in run_ids and model.status == LoggedModelStatus.PENDING:
                client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        token = page.token
        if not token:
            return
