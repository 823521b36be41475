"""Stage progress in the Prefect UI: a progress artifact per stage, rate-limited, 100 at the end."""

from __future__ import annotations

from uuid import UUID

from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.objects import Artifact

from components.common.progress import Progress
from tasks.common.progress import ProgressArtifact, stage_progress


def artifacts(key: str) -> list[Artifact]:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )


@task
def stage(key: str, steps: int) -> int:
    with stage_progress(key, f"{steps} steps") as progress:
        for _ in Progress(range(steps), desc="stage", on_progress=progress):
            pass
    return progress.sent


@task
def stage_on_a_clock(key: str, steps: int, seconds_per_step: float) -> tuple[int, float | None]:
    now = [0.0]
    progress = ProgressArtifact(key, "timed", every_s=2.0, clock=lambda: now[0])
    for i in range(steps):
        now[0] += seconds_per_step
        progress((i + 1) / steps, i + 1, steps)
    return progress.sent, progress.percent


@flow
def stages() -> tuple[int, tuple[int, float | None]]:
    return stage("progress-fast", 10_000), stage_on_a_clock("progress-timed", 1000, 0.01)


def test_a_task_run_publishes_its_progress_as_an_artifact() -> None:
    fast_sent, (timed_sent, timed_percent) = stages()

    (fast,) = artifacts("progress-fast")
    assert fast.type == "progress"
    assert fast.data == 100
    assert isinstance(fast.task_run_id, UUID)  # shown under the task run that reported it
    assert fast_sent <= 3  # 0%, 100% and at most one between: 10,000 steps cost 2-3 requests

    (timed,) = artifacts("progress-timed")
    assert timed.data == timed_percent == 100
    assert 5 <= timed_sent <= 7  # 10 s of steps at most once every 2 s, then the final 100%
