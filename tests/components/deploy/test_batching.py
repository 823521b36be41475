"""The micro-batcher in a real event loop, with a real thread pool and NumPy "models"."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from components.deploy.batching import MicroBatcher


class Scaler:
    """A stand-in model: multiplies its input, and records every batch it was given."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def run(self, x: np.ndarray) -> np.ndarray:
        self.gate.wait(30)
        self.batches.append(len(x))
        return x * self.factor


def _run(model: Scaler, x: np.ndarray) -> np.ndarray:
    return model.run(x)


def _rows(n: int, start: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32)[:, None]


async def _with_batcher(max_batch: int, max_wait_s: float, body):  # type: ignore[no-untyped-def]
    seen: list[int] = []
    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(_run, pool, max_batch, max_wait_s, on_batch=seen.append)
        batcher.start()
        try:
            return await body(batcher), seen
        finally:
            await batcher.stop()


def test_concurrent_requests_share_full_batches_and_get_their_own_rows() -> None:
    model = Scaler(2.0)

    async def body(batcher: MicroBatcher[Scaler]) -> list[np.ndarray]:
        # A long wait: only a full batch (or the end of the queue) can start a run.
        return await asyncio.gather(*(batcher.submit(model, _rows(2, 10 * i)) for i in range(4)))

    outs, seen = asyncio.run(_with_batcher(4, 30.0, body))
    assert seen == [4, 4] and model.batches == [4, 4]
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out, _rows(2, 10 * i) * 2.0)


def test_requests_for_another_model_never_share_a_batch() -> None:
    old, new = Scaler(1.0), Scaler(-1.0)

    async def body(batcher: MicroBatcher[Scaler]) -> list[np.ndarray]:
        order = [old, old, new, old]
        return await asyncio.gather(*(batcher.submit(m, _rows(1, i)) for i, m in enumerate(order)))

    outs, seen = asyncio.run(_with_batcher(8, 0.01, body))
    assert [float(o[0, 0]) for o in outs] == [0.0, 1.0, -2.0, 3.0]
    assert seen == [2, 1, 1]


def test_a_lone_request_runs_after_the_wait_and_a_big_one_runs_alone() -> None:
    model = Scaler(3.0)

    async def body(batcher: MicroBatcher[Scaler]) -> list[np.ndarray]:
        lone = await batcher.submit(model, _rows(1, 0))
        big = await batcher.submit(model, _rows(10, 0))
        return [lone, big]

    (_, big), seen = asyncio.run(_with_batcher(4, 0.001, body))
    assert seen == [1, 10]
    np.testing.assert_array_equal(big, _rows(10, 0) * 3.0)


def test_a_failing_batch_fails_its_requests_only() -> None:
    class Broken(Scaler):
        def run(self, x: np.ndarray) -> np.ndarray:
            raise RuntimeError("session exploded")

    good, broken = Scaler(1.0), Broken(1.0)

    async def body(batcher: MicroBatcher[Scaler]) -> list[object]:
        return await asyncio.gather(
            batcher.submit(broken, _rows(1, 0)),
            batcher.submit(good, _rows(1, 5)),
            return_exceptions=True,
        )

    (failed, ok), _ = asyncio.run(_with_batcher(4, 0.01, body))
    assert isinstance(failed, RuntimeError) and "exploded" in str(failed)
    np.testing.assert_array_equal(ok, _rows(1, 5))


def test_requests_queue_while_a_batch_runs_and_cancelled_ones_are_skipped() -> None:
    model = Scaler(1.0)

    async def body(batcher: MicroBatcher[Scaler]) -> list[object]:
        model.gate.clear()  # the first batch blocks in its thread
        first = asyncio.ensure_future(batcher.submit(model, _rows(1, 0)))
        while not batcher._running:  # the first batch has started
            await asyncio.sleep(0)
        waiting = [asyncio.ensure_future(batcher.submit(model, _rows(1, i))) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        waiting[1].cancel()  # a client that went away
        model.gate.set()
        return await asyncio.gather(first, *waiting, return_exceptions=True)

    outs, seen = asyncio.run(_with_batcher(8, 0.001, body))
    assert isinstance(outs[2], asyncio.CancelledError)
    assert [float(o[0, 0]) for i, o in enumerate(outs) if i != 2] == [0.0, 1.0, 3.0]
    assert seen == [1, 2]


def test_submit_before_start_is_an_error() -> None:
    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(_run, pool, 4, 0.0)
        with pytest.raises(RuntimeError, match="not running"):
            asyncio.run(batcher.submit(Scaler(1.0), _rows(1, 0)))
