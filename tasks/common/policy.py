"""Retry policy shared by the tasks: retry transient I/O, never a deterministic failure."""

from __future__ import annotations

from typing import Any

from components.common.errors import PipelineError


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: bad data, bad config or a parity mismatch will fail again, so stop."""
    try:
        state.result()
    except PipelineError:
        return False
    except Exception:
        return True
    return False
