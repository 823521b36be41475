"""Run folders of killed runs are removed by the next run; finished, live and foreign ones stay."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from components.common.ownership import (
    OWNER_FILE,
    Owner,
    claim_run_folder,
    release_run_folder,
    remove_abandoned_run_folders,
)
from tests.conftest import dead_pid


def _folder(root: Path, name: str, owner: dict[str, object] | None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"partial")
    if owner is not None:
        (folder / OWNER_FILE).write_text(json.dumps(owner))
    return folder


def test_only_folders_of_dead_owners_on_this_host_are_removed(tmp_path: Path) -> None:
    here = socket.gethostname()
    killed = _folder(tmp_path, "killed", {"host": here, "pid": dead_pid()})
    running = _folder(tmp_path, "running", {"host": here, "pid": os.getpid()})
    finished = _folder(tmp_path, "finished", None)
    elsewhere = _folder(tmp_path, "elsewhere", {"host": here + "-other", "pid": dead_pid()})
    garbled = _folder(tmp_path, "garbled", None)
    (garbled / OWNER_FILE).write_text("{not json")

    assert remove_abandoned_run_folders(tmp_path) == [killed]
    assert not killed.exists()
    for kept in (running, finished, elsewhere, garbled):
        assert (kept / "model.onnx").is_file(), kept


def test_a_claimed_folder_is_kept_while_its_owner_lives_and_after_release(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    claim_run_folder(run)
    assert json.loads((run / OWNER_FILE).read_text()) == {
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    assert remove_abandoned_run_folders(tmp_path) == []
    release_run_folder(run)
    assert not (run / OWNER_FILE).exists()
    assert remove_abandoned_run_folders(tmp_path) == [] and run.is_dir()


def test_owner_tags_round_trip_and_other_tags_are_not_owners() -> None:
    owner = Owner("host-1.example", 4242)
    assert Owner.from_tag(owner.to_tag()) == owner
    for tag in ("transfer-pipeline", "owner:", "owner:host", "owner:host:x", "other:h:1"):
        assert Owner.from_tag(tag) is None, tag
    assert not Owner("somewhere-else", dead_pid()).is_gone()  # not ours to judge
    assert Owner(socket.gethostname(), dead_pid()).is_gone()
    assert not Owner.current().is_gone()
