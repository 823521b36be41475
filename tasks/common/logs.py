"""Prefect's failure logs without the traceback when the failure is the user's to fix.

Prefect logs a failed task or flow run with its traceback (60-80 lines). For a ``PipelineError``
(bad data, layout or configuration) that buries the one message that matters, which the CLI prints
itself; for anything else, a bug, the traceback is the evidence and stays.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from components.common.errors import PipelineError

# Where Prefect's engines log run failures (with ``exc_info``).
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class UserErrorTracebacks(logging.Filter):
    """Drops records that carry a ``PipelineError`` traceback; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, PipelineError)


@contextmanager
def quiet_user_errors() -> Iterator[None]:
    """Within the block, Prefect's run loggers drop user errors' tracebacks (see module doc)."""
    quiet = UserErrorTracebacks()
    loggers = [logging.getLogger(name) for name in RUN_LOGGERS]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)
