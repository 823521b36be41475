"""Layouts: each accepted one labels images by their class folder, each refused one says why.

Real folders of real images in tmp_path; every refusal must name the folders that make it one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from components.common.config import DataConfig, ValidationConfig
from components.common.errors import DataValidationError, LayoutError
from components.data.scan import ScanResult, scan_folder
from tests.conftest import write_photo


def _scan(root: Path) -> ScanResult:
    return scan_folder(root, DataConfig(), ValidationConfig(), seed=0)


def _classes(folder: Path, names: tuple[str, ...] = ("cat", "dog"), n: int = 4, seed: int = 0):
    for k, name in enumerate(names):
        for i in range(n):
            write_photo(folder / name / f"{i}.png", seed=seed + 100 * k + i, size=(24, 24))


def _refused(root: Path) -> str:
    with pytest.raises(LayoutError) as caught:
        _scan(root)
    return str(caught.value)


# accepted


def test_class_folders_are_the_labels(tmp_path: Path) -> None:
    _classes(tmp_path)
    result = _scan(tmp_path)
    assert result.summary.layout == "classes"
    assert sorted(set(result.manifest["label"])) == ["cat", "dog"]
    assert result.summary.notes == ()


def test_split_folders_match_case_insensitively_with_aliases(tmp_path: Path) -> None:
    for k, split in enumerate(("Train", "VALID", "Testing")):
        _classes(tmp_path / split, seed=1000 * k)
    m = _scan(tmp_path).manifest
    folder = m["relpath"].str.split("/").str[0]
    expected = folder.map({"Train": "train", "VALID": "val", "Testing": "test"})
    assert (m["split"] == expected).all() and set(m["split"]) == {"train", "val", "test"}
    assert sorted(set(m["label"])) == ["cat", "dog"]


def test_train_and_test_without_val_carve_val_from_train_with_a_note(tmp_path: Path) -> None:
    _classes(tmp_path / "train", n=8)
    _classes(tmp_path / "test", seed=500)
    result = _scan(tmp_path)
    m = result.manifest
    from_train = m["relpath"].str.startswith("train/")
    assert set(m.loc[from_train, "split"]) == {"train", "val"}
    assert (m.loc[~from_train, "split"] == "test").all()
    assert any("no val/ folder" in n and "train/" in n for n in result.summary.notes)


def test_images_at_any_depth_take_their_class_folder(tmp_path: Path) -> None:
    _classes(tmp_path)
    write_photo(tmp_path / "cat" / "indoor" / "a.png", seed=50, size=(24, 24))
    write_photo(tmp_path / "cat" / "outdoor" / "2019" / "deep" / "b.png", seed=51, size=(24, 24))
    result = _scan(tmp_path)
    m = result.manifest.set_index("relpath")
    assert m.loc["cat/indoor/a.png", "label"] == "cat"
    assert m.loc["cat/outdoor/2019/deep/b.png", "label"] == "cat"
    assert sorted(set(m["label"])) == ["cat", "dog"]  # sub-folder names are never labels
    (note,) = [n for n in result.summary.notes if "sub-folders" in n]
    assert "cat/ (indoor, outdoor)" in note and "dog/" not in note


def test_images_outside_class_folders_are_named_and_not_used(tmp_path: Path) -> None:
    _classes(tmp_path)
    write_photo(tmp_path / "loose.png", seed=60, size=(24, 24))
    (tmp_path / "README.md").write_text("about this data")
    result = _scan(tmp_path)
    assert "loose.png" not in set(result.manifest["relpath"])
    (note,) = [n for n in result.summary.notes if "outside any class folder" in n]
    assert "loose.png" in note
    assert result.summary.non_image_files == 1  # README.md


# refused


def test_split_folder_beside_a_class_folder_is_refused(tmp_path: Path) -> None:
    """The known defect: this trained a model with labels ["bird", "train"]."""
    _classes(tmp_path / "train")
    _classes(tmp_path, names=("bird",), seed=700)
    message = _refused(tmp_path)
    assert "mixes split folders (train/)" in message and "other folders (bird/)" in message
    assert "ROOT/<class>/<image>" in message and "ROOT/{train,val,test}" in message


def test_train_and_val_beside_a_class_folder_is_refused(tmp_path: Path) -> None:
    """The known defect: bird/ was dropped without a word."""
    _classes(tmp_path / "train")
    _classes(tmp_path / "val", seed=300)
    _classes(tmp_path, names=("bird",), seed=700)
    message = _refused(tmp_path)
    assert "train/, val/" in message and "bird/" in message and "expected" in message


def test_a_split_folder_alone_is_refused(tmp_path: Path) -> None:
    _classes(tmp_path / "train")
    message = _refused(tmp_path)
    assert "train/ folder and no other" in message and "expected" in message
    assert str(tmp_path / "train") in message  # what to pass instead


def test_class_folders_inside_one_wrapper_folder_are_refused(tmp_path: Path) -> None:
    _classes(tmp_path / "Dataset")
    message = _refused(tmp_path)
    assert "one folder, Dataset/" in message and "cat/, dog/" in message
    assert "expected" in message and str(tmp_path / "Dataset") in message


def test_split_folders_inside_a_wrapper_folder_are_refused(tmp_path: Path) -> None:
    _classes(tmp_path / "data" / "train")
    _classes(tmp_path / "data" / "val", seed=300)
    message = _refused(tmp_path)
    assert "one folder, data/" in message and "train/, val/" in message


def test_split_folders_without_train_are_refused(tmp_path: Path) -> None:
    _classes(tmp_path / "val")
    _classes(tmp_path / "test", seed=300)
    message = _refused(tmp_path)
    assert "test/, val/" in message and "no train/ folder" in message


def test_two_folders_for_one_split_are_refused(tmp_path: Path) -> None:
    _classes(tmp_path / "train")
    _classes(tmp_path / "val", seed=300)
    _classes(tmp_path / "validation", seed=600)
    message = _refused(tmp_path)
    assert "2 folders for the val split (val/, validation/)" in message


def test_split_folders_inside_class_folders_are_refused(tmp_path: Path) -> None:
    for split in ("train", "val"):
        _classes(tmp_path / "cat" / split, names=("x",))
        _classes(tmp_path / "dog" / split, names=("x",), seed=300)
    message = _refused(tmp_path)
    assert "cat/ holds train/, val/" in message and "dog/ holds train/, val/" in message
    assert "ROOT/{train,val,test}/<class>/<image>" in message


def test_split_folder_without_class_folders_is_refused(tmp_path: Path) -> None:
    _classes(tmp_path / "train")
    for i in range(3):
        write_photo(tmp_path / "val" / f"{i}.png", seed=i, size=(24, 24))
    message = _refused(tmp_path)
    assert "split folder val/" in message and "no class folders" in message


def test_images_directly_in_the_root_are_refused(tmp_path: Path) -> None:
    write_photo(tmp_path / "a.png", seed=1, size=(24, 24))
    message = _refused(tmp_path)
    assert "no images found" in message and "1 file(s) directly in it" in message


def test_layout_errors_are_data_errors() -> None:
    """Callers that stop on bad data (exit status 2) stop on a refused layout too."""
    assert issubclass(LayoutError, DataValidationError)
