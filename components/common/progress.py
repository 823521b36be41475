"""Progress of a long loop, readable in a terminal and in a log that a worker or CI keeps.

On a terminal this is tqdm's bar. Anywhere else a bar's carriage-return updates become one line
each (one embedding of 59,000 images wrote ~900 of them), so without a TTY a plain line is written
at each tenth of the work and at most every ``TRANSFER_PROGRESS_EVERY_S`` seconds between them
(default 10), then a final line. ``TQDM_DISABLE=1`` silences both. Whoever runs the loop may also
pass ``on_progress(fraction, done, total)``, called after every step whatever is shown, so an
orchestrator can publish progress without this module knowing it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TextIO, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
# (fraction done in [0, 1], steps done, steps in all or None when unknown)
ProgressCallback = Callable[[float, int, int | None], None]

EVERY_S_ENV = "TRANSFER_PROGRESS_EVERY_S"
DEFAULT_EVERY_S = 10.0
STEPS = 10  # without a TTY, a line at each tenth of the work


def progress_disabled() -> bool:
    """Whether ``TQDM_DISABLE`` asks for silence (tqdm's own variable, so one switch does both)."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes")


def line_interval_s() -> float:
    """Seconds between plain progress lines: ``TRANSFER_PROGRESS_EVERY_S``, else 10."""
    raw = os.environ.get(EVERY_S_ENV, "")
    try:
        return float(raw) if raw.strip() else DEFAULT_EVERY_S
    except ValueError:
        return DEFAULT_EVERY_S


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def within(on_progress: ProgressCallback | None, start: float, stop: float) -> ProgressCallback:
    """``on_progress`` for one part of a larger job: its fractions mapped into [start, stop]."""

    def report(fraction: float, done: int, total: int | None) -> None:
        if on_progress is not None:
            on_progress(start + (stop - start) * fraction, done, total)

    return report


def _clock_text(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress(Generic[T]):
    """``iterable`` with its progress shown (see the module doc); iterate it once."""

    def __init__(
        self,
        iterable: Iterable[T],
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        *,
        stream: TextIO | None = None,
        every_s: float | None = None,
        on_progress: ProgressCallback | None = None,
        disable: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total is None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = line_interval_s() if every_s is None else every_s
        self.on_progress = on_progress
        self.quiet = disable or progress_disabled()
        self.clock = clock
        self.postfix = ""
        self._bar: tqdm | None = None

    def set_postfix(self, **values: object) -> None:
        """Shown after the count, as tqdm's ``set_postfix`` (e.g. ``loss=0.123``)."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        if self._bar is not None:
            self._bar.set_postfix_str(self.postfix)

    def __iter__(self) -> Iterator[T]:
        terminal = not self.quiet and _is_terminal(self.stream)
        if terminal:
            self._bar = tqdm(
                total=self.total, desc=self.desc, unit=self.unit, leave=False, file=self.stream
            )
        start = last_line = self.clock()
        last_step, done = 0, 0
        try:
            for item in self.iterable:
                yield item
                done += 1
                fraction = done / self.total if self.total else 0.0
                if self.on_progress is not None:
                    self.on_progress(min(fraction, 1.0), done, self.total)
                if self._bar is not None:
                    self._bar.update(1)
                elif not self.quiet:
                    now, step = self.clock(), int(fraction * STEPS)
                    if (step > last_step and fraction < 1.0) or now - last_line >= self.every_s:
                        if fraction < 1.0:
                            self._line(done, now - start)
                        last_line, last_step = now, step
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        if self.on_progress is not None:
            self.on_progress(1.0, done, self.total)
        if not terminal and not self.quiet:
            self._line(done, self.clock() - start, final=True)

    def _line(self, done: int, elapsed: float, final: bool = False) -> None:
        count = f"{done}/{self.total}" if self.total else f"{done}"
        if final:
            text = f"{self.desc}: 100% ({count} {self.unit}) done in {_clock_text(elapsed)}"
        elif self.total:
            left = elapsed * (self.total - done) / max(done, 1)
            text = (
                f"{self.desc}: {100 * done / self.total:.0f}% ({count} {self.unit}), "
                f"{_clock_text(elapsed)} elapsed, ~{_clock_text(left)} left"
            )
        else:
            text = f"{self.desc}: {count} {self.unit}, {_clock_text(elapsed)} elapsed"
        if self.postfix:
            text += f", {self.postfix}"
        self.stream.write(text + "\n")
        self.stream.flush()
