"""Progress a log can keep: bounded plain lines without a TTY, tqdm on one, a callback always."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator

import pytest

from components.common.progress import Progress, within


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """A clock that moves only when told to, so time-driven lines are counted exactly."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("TRANSFER_PROGRESS_EVERY_S", raising=False)


def test_without_a_tty_ten_thousand_updates_make_a_line_per_tenth(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    monkeypatch.setenv("TRANSFER_PROGRESS_EVERY_S", "3600")  # no time-driven lines here
    items = list(
        Progress(range(10_000), desc="embedding 80000 images", unit="batch", stream=stream)
    )
    assert items == list(range(10_000))
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) <= 12
    shown = [int(m.group(1)) for line in lines[:-1] if (m := re.search(r": (\d+)% ", line))]
    assert shown == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert lines[-1].startswith("embedding 80000 images: 100% (10000/10000 batch) done in ")


def test_without_a_tty_a_slow_loop_writes_a_line_every_interval() -> None:
    stream, clock = io.StringIO(), Clock()

    def slow() -> Iterator[int]:  # no len(): only time can decide when to write
        for i in range(100):
            clock.now += 1.0
            yield i

    bar = Progress(slow(), desc="scoring", stream=stream, every_s=10.0, clock=clock)
    for _ in bar:
        bar.set_postfix(loss="0.250")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 + 1  # at 10 s, 20 s, ... 100 s, then the final line
    assert lines[0] == "scoring: 10 it, 0:10 elapsed, loss=0.250"
    assert lines[-1] == "scoring: 100% (100 it) done in 1:40, loss=0.250"


def test_on_a_tty_the_bar_is_tqdms() -> None:
    stream = Terminal()
    bar = Progress(range(50), desc="epoch 1/3", unit="batch", stream=stream)
    for _ in bar:
        bar.set_postfix(loss="0.5")
    text = stream.getvalue()
    assert "\r" in text and "/50 [" in text and "batch/s" in text  # tqdm redraws in place
    assert "loss=0.5" in text
    assert "done in" not in text


@pytest.mark.parametrize("stream_type", [io.StringIO, Terminal])
def test_tqdm_disable_silences_both_but_the_callback_still_hears(
    stream_type: type[io.StringIO], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TQDM_DISABLE", "1")
    stream, heard = stream_type(), []
    list(Progress(range(4), stream=stream, on_progress=lambda *a: heard.append(a)))
    assert stream.getvalue() == ""
    assert heard[:4] == [(0.25, 1, 4), (0.5, 2, 4), (0.75, 3, 4), (1.0, 4, 4)]
    assert heard[-1] == (1.0, 4, 4)


def test_a_loop_left_early_claims_no_completion() -> None:
    stream, heard = io.StringIO(), []
    for i in Progress(range(100), stream=stream, on_progress=lambda f, *_: heard.append(f)):
        if i == 49:
            break
    assert max(heard) == 0.49  # the 50th item was handed out, but not finished
    assert "done in" not in stream.getvalue()


def test_within_maps_a_part_into_its_share() -> None:
    heard: list[float] = []
    second_half = within(lambda f, d, t: heard.append(f), 0.5, 1.0)
    for fraction in (0.0, 0.5, 1.0):
        second_half(fraction, 0, None)
    assert heard == [0.5, 0.75, 1.0]
    within(None, 0.0, 1.0)(0.3, 1, 3)  # no listener: nothing to call, no error
