"""Shards on a Dask cluster: the task runner a run's scan and embedding spread their work over
(``run.task_runner``), and the submission of one Prefect task run per shard.

With ``run.task_runner: local`` (the default) there is no runner and Dask is never imported: the
stages run in the flow's process exactly as they always have.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from prefect import Task
from prefect.task_runners import TaskRunner

from components.common.config import RunConfig
from components.engine.onnx_graphs import available_cpus


class Shards:
    """A started task runner and how much work one shard (one task run) takes."""

    def __init__(self, runner: TaskRunner | None, size: int) -> None:
        self.runner, self.size = runner, size

    def __reduce__(self) -> tuple[Any, ...]:
        # Prefect sends the submitting task's parameters (this among them) with every shard; the
        # runner and its Dask client belong to the flow's process, so only the size travels. (A
        # plain class, not a dataclass: Prefect would dump a dataclass field by field.)
        return (Shards, (None, self.size))

    def run(self, task: Task[..., Any], parameters: Sequence[dict[str, Any]]) -> list[Any]:
        """One run of ``task`` per parameter set, all submitted at once; their results in the
        order given, whichever finished first. A failed shard raises its error here."""
        assert self.runner is not None, "shards are submitted from the flow's process"
        futures = [self.runner.submit(task, parameters=p) for p in parameters]
        return [future.result() for future in futures]


def dask_runner(run: RunConfig) -> TaskRunner:
    """A ``DaskTaskRunner`` for ``run.task_runner`` (``dask`` or ``dask:tcp://HOST:PORT``).

    ``dask`` starts a LocalCluster on 127.0.0.1 when the first shard is submitted: one worker
    process per CPU (or ``run.dask_workers``), one thread each, since every shard is CPU-bound
    and sizes its own ONNX Runtime threads to its worker's.
    """
    from prefect_dask import DaskTaskRunner  # here: the default path never imports Dask

    if run.task_runner == "dask":
        workers = run.dask_workers or available_cpus()
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": workers,
                "threads_per_worker": 1,
                "processes": True,
                "host": "127.0.0.1",
                "dashboard_address": ":0",  # a free port (Dask serves health checks there)
            }
        )
    return DaskTaskRunner(address=run.task_runner.removeprefix("dask:"))


@contextmanager
def open_shards(run: RunConfig) -> Iterator[Shards | None]:
    """The run's shards on Dask, or None for ``local``; a cluster this started is closed on exit,
    however the block ends."""
    if run.task_runner == "local":
        yield None
        return
    with dask_runner(run) as runner:
        yield Shards(runner, run.shard_images)


def worker_threads() -> int | None:
    """Threads of the Dask worker running the calling task (None outside a worker)."""
    from distributed import get_worker

    try:
        return get_worker().state.nthreads
    except ValueError:
        return None
