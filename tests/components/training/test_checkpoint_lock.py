"""Two fine-tunes of one checkpoint key never write it together: the second waits for the first."""

from __future__ import annotations

import threading
from pathlib import Path

from components.training.checkpoints import exclusive


def test_a_second_holder_waits_until_the_first_leaves(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints" / "0123abcd"
    order: list[str] = []
    first_in, second_tried = threading.Event(), threading.Event()

    def first() -> None:
        with exclusive(folder):
            order.append("first in")
            first_in.set()
            second_tried.wait(10)
            # the second thread is blocked on the lock now, unless the lock is broken
            order.append("first out")

    def second() -> None:
        first_in.wait(10)
        threading.Timer(0.5, second_tried.set).start()
        with exclusive(folder):
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert order == ["first in", "first out", "second in"]
    assert (tmp_path / "checkpoints" / "0123abcd.lock").is_file()


def test_different_keys_and_run_folder_checkpoints_do_not_wait(tmp_path: Path) -> None:
    with exclusive(tmp_path / "a"), exclusive(tmp_path / "b"), exclusive(None):
        pass  # would deadlock if one lock covered every key
