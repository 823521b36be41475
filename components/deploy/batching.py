"""Micro-batching: concurrent requests share one ONNX Runtime call.

A batch runs once it holds ``max_batch`` images or its oldest request has waited ``max_wait_s``
(the queue delay of Triton's dynamic batcher), whichever comes first. Requests queue while every
runner is busy, so under load batches fill without waiting and an idle server adds at most
``max_wait_s`` to a request. Only requests for the same model object share a batch: after a hot
reload, requests made with the old version's preprocessing still run on the old version.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

log = logging.getLogger(__name__)

M = TypeVar("M")


@dataclass
class _Job(Generic[M]):
    model: M
    x: np.ndarray
    future: asyncio.Future[np.ndarray]
    queued: float = field(default=0.0)


class MicroBatcher(Generic[M]):
    """Collects ``submit`` calls into batches and runs ``run(model, batch)`` in ``executor``.

    ``runners`` batches may run at once (each on its own executor thread); ``on_batch`` is told
    every batch's size (the metrics' batch-size histogram). Start it inside the event loop that
    will submit to it, and stop it there.
    """

    def __init__(
        self,
        run: Callable[[M, np.ndarray], np.ndarray],
        executor: Executor,
        max_batch: int,
        max_wait_s: float,
        runners: int = 1,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._run = run
        self._executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._runners = runners
        self._on_batch = on_batch
        self._pending: deque[_Job[M]] = deque()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(runners)
        self._running: set[asyncio.Task[None]] = set()
        self._collector: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start collecting (idempotent)."""
        if self._collector is None:
            self._collector = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        """Finish the batches already running, then fail what is still queued."""
        if self._collector is not None:
            self._collector.cancel()
            await asyncio.gather(self._collector, return_exceptions=True)
            self._collector = None
        await asyncio.gather(*self._running, return_exceptions=True)
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))

    async def submit(self, model: M, x: np.ndarray) -> np.ndarray:
        """``run(model, x)``'s rows for ``x`` (N, ...), computed in a batch with other requests."""
        if self._collector is None:
            raise RuntimeError("the batcher is not running")
        loop = asyncio.get_running_loop()
        job = _Job(model, x, loop.create_future(), loop.time())
        self._pending.append(job)
        self._wakeup.set()
        return await job.future

    def _ready(self) -> bool:
        # Full, or blocked by a request for another model (a reload): run what is there.
        first, images = self._pending[0].model, 0
        for job in self._pending:
            if job.model is not first:
                return True
            images += len(job.x)
            if images >= self.max_batch:
                return True
        return False

    def _take(self) -> list[_Job[M]]:
        jobs = [self._pending.popleft()]
        images = len(jobs[0].x)
        while self._pending:
            job = self._pending[0]
            if job.model is not jobs[0].model or images + len(job.x) > self.max_batch:
                break
            jobs.append(self._pending.popleft())
            images += len(job.x)
        return jobs

    async def _wait_for_work(self) -> None:
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                await self._wait_for_work()
                while self._pending and self._pending[0].future.done():
                    self._pending.popleft()  # the client went away before its turn
                if not self._pending:
                    self._slots.release()
                    continue
                deadline = self._pending[0].queued + self.max_wait_s
                while not self._ready() and (remaining := deadline - loop.time()) > 0:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except TimeoutError:
                        break
                jobs = self._take()
            except BaseException:
                self._slots.release()
                raise
            task = loop.create_task(self._execute(jobs))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _execute(self, jobs: list[_Job[M]]) -> None:
        try:
            live = [j for j in jobs if not j.future.done()]
            if not live:
                return
            batch = live[0].x if len(live) == 1 else np.concatenate([j.x for j in live])
            if self._on_batch is not None:
                self._on_batch(len(batch))
            loop = asyncio.get_running_loop()
            try:
                out = await loop.run_in_executor(self._executor, self._run, live[0].model, batch)
            except Exception as err:
                log.exception("a batch of %d failed", len(batch))
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(err)
                return
            start = 0
            for job in live:
                n = len(job.x)
                if not job.future.done():
                    job.future.set_result(out[start : start + n])
                start += n
        finally:
            self._slots.release()
