"""Flow runs left RUNNING by a killed process are marked Crashed by the next run, on a real
(temporary) Prefect server; runs of live processes and of other hosts are left alone."""

from __future__ import annotations

import os
import socket

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Crashed, Running

from components.common.ownership import Owner
from tasks.common.ownership import PIPELINE_TAG, claim_flow_run, crash_abandoned_flow_runs
from tests.conftest import dead_pid


@flow(name="ownership-probe")
def _probe() -> None:
    pass


def test_only_runs_of_dead_owners_on_this_host_are_crashed() -> None:
    here = socket.gethostname()
    owners = {
        "killed": Owner(here, dead_pid()),
        "alive": Owner(here, os.getpid()),
        "elsewhere": Owner(here + "-other", dead_pid()),
    }
    ids = {}
    with get_client(sync_client=True) as client:
        for name, owner in owners.items():
            run = client.create_flow_run(_probe, name=name, tags=[PIPELINE_TAG, owner.to_tag()])
            client.set_flow_run_state(run.id, Running(), force=True)
            ids[name] = run.id
        untagged = client.create_flow_run(_probe, name="not-ours", tags=["other"])
        client.set_flow_run_state(untagged.id, Running(), force=True)

        crashed = crash_abandoned_flow_runs()

        states = {name: client.read_flow_run(i).state for name, i in ids.items()}
        assert str(ids["killed"]) in crashed
        assert states["killed"].is_crashed()
        assert str(owners["killed"].pid) in (states["killed"].message or "")
        assert states["alive"].is_running() and states["elsewhere"].is_running()
        assert client.read_flow_run(untagged.id).state.is_running()
        for run_id in (ids["alive"], ids["elsewhere"], untagged.id):  # tidy the shared server
            client.set_flow_run_state(run_id, Crashed(message="test over"), force=True)


def test_claiming_keeps_other_tags_and_replaces_an_old_owner() -> None:
    with get_client(sync_client=True) as client:
        stale = Owner("old-host", 1).to_tag()
        run = client.create_flow_run(_probe, tags=["team-a", stale])
        claim_flow_run(run.id, ["team-a", stale])
        tags = set(client.read_flow_run(run.id).tags)
    assert tags == {"team-a", PIPELINE_TAG, Owner.current().to_tag()}
