"""Flow runs that a killed process left RUNNING are marked Crashed by the next run.

Prefect ends a flow run's state from inside the process that runs it, so a SIGKILL (or an OOM
kill, or a power cut) leaves it RUNNING in the server's database for ever: the UI shows a run
that is not running and automations keyed on its end never fire. Each flow run of this pipeline
therefore tags itself with its owner (``owner:HOST:PID``), and the next one on the same host
marks those whose owner is gone Crashed. Plain functions, not tasks: a few API calls.
"""

from __future__ import annotations

import logging
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.states import Crashed

from components.common.ownership import Owner

log = logging.getLogger(__name__)

PIPELINE_TAG = "transfer-pipeline"
UNFINISHED = [StateType.RUNNING, StateType.PENDING, StateType.CANCELLING]


def claim_flow_run(flow_run_id: UUID | str, tags: list[str]) -> None:
    """Tag the flow run with this process as its owner (keeping its other tags)."""
    owner = Owner.current().to_tag()
    kept = [t for t in tags if Owner.from_tag(t) is None]
    with get_client(sync_client=True) as client:
        client.update_flow_run(UUID(str(flow_run_id)), tags=[*kept, PIPELINE_TAG, owner])


def crash_abandoned_flow_runs(exclude: UUID | str | None = None) -> list[str]:
    """Mark Crashed the unfinished flow runs of this pipeline whose owning process is gone."""
    crashed = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[PIPELINE_TAG]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=UNFINISHED)),
            ),
            limit=200,
        )
        for run in runs:
            if exclude is not None and str(run.id) == str(exclude):
                continue
            owners = [o for o in map(Owner.from_tag, run.tags) if o is not None]
            if owners and all(o.is_gone() for o in owners):
                message = f"its process (pid {owners[0].pid}) is gone: killed"
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                crashed.append(str(run.id))
    if crashed:
        log.info("marked %d flow run(s) of killed processes Crashed: %s", len(crashed), crashed)
    return crashed
