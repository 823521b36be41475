"""A stage's progress in the Prefect UI: one progress artifact per stage, under a stable key.

Components report progress through a plain callback (``components.common.progress``); this is
the callback that forwards it to Prefect, at most once every ``every_s`` seconds, since each
update is a request to the API. Progress is advice: if the API refuses an update, the stage goes
on and the reporter stops sending.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

EVERY_S = 2.0


class ProgressArtifact:
    """A ``ProgressCallback`` that keeps the progress artifact ``key`` of this run up to date."""

    def __init__(
        self,
        key: str,
        description: str,
        every_s: float = EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.key, self.description, self.every_s, self.clock = key, description, every_s, clock
        self.artifact_id: UUID | None = None
        self.sent = 0  # requests made (the rate limit keeps this small)
        self.percent: float | None = None
        self._last_sent = float("-inf")
        self._broken = False

    def __call__(self, fraction: float, done: int = 0, total: int | None = None) -> None:
        now = self.clock()
        if fraction < 1.0 and now - self._last_sent < self.every_s:
            return
        self._send(round(100 * min(max(fraction, 0.0), 1.0), 1), now)

    def _send(self, percent: float, now: float) -> None:
        if self._broken or percent == self.percent:
            return
        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(
                    percent, key=self.key, description=self.description
                )
            else:
                update_progress_artifact(self.artifact_id, percent)
        except Exception as err:  # the UI's progress must never fail a stage
            self._broken = True
            get_run_logger().warning("progress artifact %s not updated: %s", self.key, err)
            return
        self.sent += 1
        self.percent, self._last_sent = percent, now


@contextmanager
def stage_progress(key: str, description: str) -> Iterator[ProgressArtifact]:
    """A progress artifact at 0% for the block, 100% when the block succeeds."""
    reporter = ProgressArtifact(key, description)
    reporter(0.0)
    yield reporter
    reporter(1.0)
