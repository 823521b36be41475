"""Clutter is never data, at any depth; links are followed only inside the data folder.

Every clutter entry below is a real, decodable image where it could be one, so a scan that
trained on clutter would show it in the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from components.common.config import DataConfig, ValidationConfig
from components.common.errors import DataValidationError
from components.data.scan import ScanResult, scan_folder
from components.data.validation import validate_manifest
from tests.conftest import write_photo


def _scan(root: Path, **data: object) -> ScanResult:
    return scan_folder(root, DataConfig(**data), ValidationConfig(), seed=0)


def _dataset(root: Path, n: int = 6) -> Path:
    for k, label in enumerate(("cat", "dog")):
        for i in range(n):
            write_photo(root / label / f"{i}.png", seed=100 * k + i, size=(24, 24))
    return root


def _clutter(root: Path) -> None:
    """14 clutter entries: 9 hidden, 3 __MACOSX, 2 Thumbs.db (images inside where possible)."""
    image = (root / "cat" / "0.png").read_bytes()
    for folder in (root, root / "cat", root / "dog" / "deep"):  # 3 __MACOSX
        (folder / "__MACOSX" / "cat").mkdir(parents=True)
        (folder / "__MACOSX" / "cat" / "._0.png").write_bytes(image)
    (root / "Thumbs.db").write_bytes(b"\0" * 16)  # 2 Thumbs.db, any case
    (root / "dog" / "THUMBS.DB").write_bytes(b"\0" * 16)
    hidden = [
        ".DS_Store",
        "cat/.DS_Store",
        "cat/._1.png",  # AppleDouble twin of an image
        "dog/.hidden.png",
        "dog/deep/.also.png",
        ".cache/cat/0.png",  # hidden folder at the root
        "cat/.trash/0.png",
        ".Trash-1000/dog/0.png",
        "dog/.config/x.png",
    ]
    for rel in hidden:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(image)
    write_photo(root / "dog" / "deep" / "kept.png", seed=999, size=(24, 24))


def test_clutter_is_ignored_at_every_depth_with_one_summary_line(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data")
    _clutter(root)
    result = _scan(root)
    relpaths = set(result.manifest["relpath"])
    assert relpaths == {f"{c}/{i}.png" for c in ("cat", "dog") for i in range(6)} | {
        "dog/deep/kept.png"
    }
    assert sorted(set(result.manifest["label"])) == ["cat", "dog"]
    assert result.summary.clutter == {"hidden": 9, "__MACOSX": 3, "Thumbs.db": 2}
    line = "ignored 14 clutter entries: 9 hidden, 3 __MACOSX, 2 Thumbs.db"
    assert result.summary.clutter_line() == line
    assert result.summary.to_dict()["clutter_summary"] == line


def test_notebook_checkpoints_in_a_class_folder_are_not_trained_on(tmp_path: Path) -> None:
    """The known defect: files in ROOT/<cls>/.ipynb_checkpoints/ were in the manifest."""
    root = _dataset(tmp_path / "data")
    shutil.copy(root / "cat" / "0.png", root / "cat" / "0-checkpoint.png")
    (root / "cat" / ".ipynb_checkpoints").mkdir()
    shutil.move(root / "cat" / "0-checkpoint.png", root / "cat" / ".ipynb_checkpoints")
    for name in ("@eaDir", ".git"):
        (root / "dog" / name).mkdir()
        shutil.copy(root / "dog" / "0.png", root / "dog" / name / "0.png")
    (root / "dog" / "desktop.ini").write_text("[.ShellClassInfo]")
    result = _scan(root)
    assert not result.manifest["relpath"].str.contains("checkpoint|@eaDir|\\.git").any()
    assert result.summary.clutter == {
        ".git": 1,
        ".ipynb_checkpoints": 1,
        "@eaDir": 1,
        "desktop.ini": 1,
    }
    assert result.summary.non_image_files == 0  # desktop.ini is clutter, not an odd file


def test_macosx_folder_at_the_root_does_not_stop_the_run(tmp_path: Path) -> None:
    """The known defect: ROOT/__MACOSX/ (as a zip from a Mac leaves it) stopped the scan."""
    root = _dataset(tmp_path / "data")
    shutil.copytree(root / "cat", root / "__MACOSX" / "cat")
    result = _scan(root)
    assert result.summary.layout == "classes"
    assert sorted(set(result.manifest["label"])) == ["cat", "dog"]
    assert result.summary.clutter == {"__MACOSX": 1}


def test_loops_and_dangling_links_are_named_and_skipped(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data")
    (root / "cat" / "again").symlink_to(root / "cat", target_is_directory=True)
    (root / "dog" / "up").symlink_to(root, target_is_directory=True)
    (root / "dog" / "self.png").symlink_to(root / "dog" / "self.png")
    (root / "cat" / "gone.png").symlink_to(root / "cat" / "deleted.png")
    (root / "cat" / "sub").mkdir()
    (root / "cat" / "sub" / "round").symlink_to(root / "dog", target_is_directory=True)
    (root / "dog" / "back").symlink_to(root / "cat" / "sub", target_is_directory=True)
    result = _scan(root)
    skipped = {s.path: s.reason for s in result.summary.skipped}
    assert "loop" in skipped["cat/again"] and "loop" in skipped["dog/up"]
    assert "loop" in skipped["dog/self.png"]
    assert "dangling" in skipped["cat/gone.png"]
    # cat/sub/round -> dog, whose back -> cat/sub: the walk stops where it would go round.
    assert "loop" in skipped["cat/sub/round/back"]
    assert "loop" in skipped["dog/back/round"]
    assert result.summary.to_dict()["skipped"] == [
        {"path": p, "reason": r} for p, r in skipped.items()
    ]
    # the dog images reached through cat/sub/round are labelled cat: validation then flags
    # them as the same content under two labels
    assert (result.manifest["relpath"] == "cat/sub/round/0.png").any()


def test_links_inside_the_data_folder_are_followed(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data")
    shared = root / "dog" / "more"
    shared.mkdir()
    write_photo(shared / "m.png", seed=77, size=(24, 24))
    (root / "cat" / "alias.png").symlink_to(root / "dog" / "0.png")
    result = _scan(root)
    m = result.manifest.set_index("relpath")
    assert m.loc["cat/alias.png", "label"] == "cat"
    assert m.loc["cat/alias.png", "path"] == str(root.resolve() / "cat" / "alias.png")
    assert result.summary.skipped == ()


def test_links_out_of_the_data_folder_are_refused_by_their_own_path(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data")
    elsewhere = _dataset(tmp_path / "private-photos")
    (root / "cat" / "extra.png").symlink_to(elsewhere / "cat" / "0.png")
    (root / "bird").symlink_to(elsewhere / "dog", target_is_directory=True)
    with pytest.raises(DataValidationError) as caught:
        _scan(root)
    message = str(caught.value)
    assert "2 symbolic link(s)" in message and "bird, cat/extra.png" in message
    assert "private-photos" not in message  # named by where they are, not where they lead
    assert "data.follow_external_links: true" in message

    result = _scan(root, follow_external_links=True)
    m = result.manifest.set_index("relpath")
    assert m.loc["cat/extra.png", "label"] == "cat" and m.loc["bird/3.png", "label"] == "bird"
    assert m.loc["bird/3.png", "path"].startswith(str(root.resolve()))


def test_pipes_and_undecodable_names_are_skipped_not_read(tmp_path: Path) -> None:
    """A named pipe would block the scan forever on read; a non-UTF-8 name breaks the CSV."""
    root = _dataset(tmp_path / "data")
    os.mkfifo(root / "cat" / "pipe.png")
    bad_name = os.fsencode(root / "dog") + b"/caf\xe9.png"
    with open(bad_name, "wb") as f:
        f.write((root / "dog" / "0.png").read_bytes())
    result = _scan(root)
    skipped = {s.path: s.reason for s in result.summary.skipped}
    assert "not a regular file" in skipped["cat/pipe.png"]
    assert "not valid UTF-8" in skipped["dog/caf\\xe9.png"]
    assert len(result.manifest) == 12


def test_scan_summary_is_in_the_validation_report(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data")
    _clutter(root)
    (root / "cat" / "gone.png").symlink_to(root / "cat" / "deleted.png")
    result = _scan(root)
    report = validate_manifest(
        result.manifest, ValidationConfig(), tmp_path / "out", result.summary
    )
    saved = json.loads(report.json_path.read_text())["report"]["scan"]
    assert saved["clutter"] == {"hidden": 9, "__MACOSX": 3, "Thumbs.db": 2}
    assert saved["skipped"] == [{"path": "cat/gone.png", "reason": saved["skipped"][0]["reason"]}]
    markdown = report.to_markdown()
    assert "ignored 14 clutter entries" in markdown and "skipped cat/gone.png" in markdown
