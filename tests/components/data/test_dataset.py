import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.common.config import DataConfig, ValidationConfig
from components.common.errors import DataValidationError
from components.data.scan import MANIFEST_COLUMNS, assign_splits, read_manifest, scan_dataset
from components.data.validation import validate_manifest
from tests.conftest import write_photo


def _scan(root: Path) -> pd.DataFrame:
    return scan_dataset(root, DataConfig(), ValidationConfig(), seed=0)


def _fingerprint(root: Path) -> dict[str, tuple[str, float]]:
    return {
        str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_class_layout_gets_stratified_seeded_split(digits_root: Path) -> None:
    m = _scan(digits_root)
    assert list(m.columns) == list(MANIFEST_COLUMNS)
    assert len(m) == 400 and m["decodable"].all()
    per = m.groupby(["label", "split"]).size().unstack()
    assert (per["val"] >= 1).all() and (per["test"] >= 1).all() and (per["train"] >= 20).all()
    shares = m["split"].value_counts(normalize=True)
    assert abs(shares["val"] - 0.15) < 0.05 and abs(shares["test"] - 0.15) < 0.05
    assert _scan(digits_root)["split"].tolist() == m["split"].tolist()  # same seed, same split
    other = scan_dataset(digits_root, DataConfig(), ValidationConfig(), seed=1)
    assert other["split"].tolist() != m["split"].tolist()


def test_new_files_never_move_old_ones_between_splits(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for label in ("a", "b"):
        for i in range(40):
            write_photo(root / label / f"{i}.png", seed=100 * len(label) + i)
    before = _scan(root).set_index("relpath")["split"]
    for label in ("a", "b"):
        for i in range(40, 60):  # half as many again: an old file would move under a ranked split
            write_photo(root / label / f"{i}.png", seed=100 * len(label) + i)
    after = _scan(root).set_index("relpath")["split"]
    assert len(after) == 120
    assert after[before.index].tolist() == before.tolist()
    assert set(after.drop(before.index)) == {"train", "val", "test"}


@pytest.mark.parametrize("seed", range(6))
def test_small_classes_keep_enough_training_images_and_one_for_validation(
    tmp_path: Path, seed: int
) -> None:
    for label, n in (("a", 3), ("b", 5), ("c", 8), ("d", 12)):
        for i in range(n):
            write_photo(tmp_path / label / f"{i}.png", seed=100 * len(label) + i, size=(24, 24))
    m = scan_dataset(tmp_path, DataConfig(), ValidationConfig(), seed=seed)
    per = m.groupby(["label", "split"]).size().unstack(fill_value=0)
    assert (per["val"] >= 1).all()
    assert all(per.loc[c, "train"] >= low for c, low in {"a": 2, "b": 3, "c": 5, "d": 6}.items())


def test_split_layout_is_kept(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for label in ("a", "b"):
            for i in range(3):
                write_photo(tmp_path / split / label / f"{i}.png", seed=i)
    m = _scan(tmp_path)
    assert set(m["split"]) == {"train", "val"}
    assert (m["relpath"].str.split("/").str[0] == m["split"]).all()


def test_train_and_test_folders_without_val_take_validation_from_train(tmp_path: Path) -> None:
    for split, n in (("train", 10), ("test", 4)):
        for label in ("a", "b"):
            for i in range(n):
                write_photo(tmp_path / split / label / f"{i}.png", seed=100 * len(label) + i)
    m = _scan(tmp_path)
    folder = m["relpath"].str.split("/").str[0]
    assert (m.loc[folder == "test", "split"] == "test").all()  # test/ is never touched
    assert set(m.loc[folder == "train", "split"]) == {"train", "val"}
    per = m[folder == "train"].groupby(["label", "split"]).size().unstack()
    assert (per["val"] >= 1).all() and (per["train"] >= 7).all()
    assert _scan(tmp_path)["split"].tolist() == m["split"].tolist()


def test_manifest_round_trips_labels_as_strings(digits_root: Path, tmp_path: Path) -> None:
    _scan(digits_root).to_csv(tmp_path / "m.csv", index=False)
    back = read_manifest(tmp_path / "m.csv")
    assert back["label"].map(type).eq(str).all() and back["decodable"].dtype == bool


def _bad_dataset(root: Path) -> dict[str, str]:
    """A usable dataset with one of each bad file; returns relpath -> expected reason fragment."""
    # Distinct seeds: a repeated one would make a (correctly) flagged duplicate.
    for k, label in enumerate(("ants", "bees")):
        for i in range(10):
            write_photo(root / label / f"{i}.jpg", seed=100 * k + i)
    (root / "ants" / "empty.jpg").write_bytes(b"")
    good = (root / "ants" / "0.jpg").read_bytes()
    (root / "ants" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "bees" / "notes.jpg").write_text("this is a text file, not a photo")
    write_photo(root / "bees" / "tiny.png", seed=5, size=(8, 8))
    Image.new("L", (5000, 5000)).save(root / "bees" / "bomb.png")
    return {
        "ants/empty.jpg": "zero-byte",
        "ants/truncated.jpg": "not decodable",
        "bees/notes.jpg": "not decodable",
        "bees/tiny.png": "too small",
        "bees/bomb.png": "decompression bomb",
    }


def test_bad_files_are_quarantined_by_listing_and_never_touched(tmp_path: Path) -> None:
    root = tmp_path / "data"
    expected = _bad_dataset(root)
    before = _fingerprint(root)
    cfg = ValidationConfig(max_image_pixels=1_000_000, max_bad_fraction=0.3)
    manifest = scan_dataset(root, DataConfig(), cfg, seed=0)
    report = validate_manifest(manifest, cfg, tmp_path / "out")
    reasons = {
        Path(q.path).relative_to(root.resolve()).as_posix(): q.reason for q in report.quarantined
    }
    assert set(reasons) == set(expected)
    for rel, fragment in expected.items():
        assert fragment in reasons[rel], (rel, reasons[rel])
    assert report.passed and report.n_usable == 20
    assert _fingerprint(root) == before  # nothing moved, deleted or rewritten


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match=r"does-not-exist.*does not exist"):
        _scan(tmp_path / "does-not-exist")


def test_folder_without_images_is_named(tmp_path: Path) -> None:
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "readme.txt").write_text("no images here")
    with pytest.raises(DataValidationError, match="contain no image files"):
        _scan(tmp_path)
    (tmp_path / "cats" / "readme.txt").unlink()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataValidationError, match="cats"):
        _scan(tmp_path)


def test_root_with_files_only_has_no_images(tmp_path: Path) -> None:
    write_photo(tmp_path / "loose.jpg", seed=1)
    with pytest.raises(DataValidationError, match="no images found"):
        _scan(tmp_path)


def test_empty_class_folder_stops_with_its_name(tmp_path: Path) -> None:
    for i in range(6):
        write_photo(tmp_path / "cats" / f"{i}.jpg", seed=i)
    (tmp_path / "dogs").mkdir()
    with pytest.raises(DataValidationError, match=r"dogs.*no image files"):
        _scan(tmp_path)


def test_single_class_dataset_fails_validation(tmp_path: Path) -> None:
    for i in range(8):
        write_photo(tmp_path / "cats" / f"{i}.jpg", seed=i)
    report = validate_manifest(_scan(tmp_path), ValidationConfig(), tmp_path / "out")
    assert not report.passed
    with pytest.raises(DataValidationError, match="1 class"):
        report.raise_if_failed()


def test_a_group_of_files_is_placed_whole_where_its_key_would_go(digits_root: Path) -> None:
    m = _scan(digits_root)
    one_by_one = assign_splits(m, DataConfig(), 0)
    assert one_by_one.tolist() == m["split"].tolist()
    # the files of each class in runs of four: each run goes where its first file went
    keys = m.groupby("label")["relpath"].transform(
        lambda r: r.iloc[(np.arange(len(r)) // 4) * 4].to_numpy()
    )
    grouped = assign_splits(m, DataConfig(), 0, groups=keys)
    assert (grouped.groupby(keys).nunique() == 1).all()
    first = keys == m["relpath"]
    # the rules that keep half of a class for training and one group for validation move whole
    # groups, never parts, and only where their class needs it
    moved = first & (grouped != one_by_one)
    val_keys = keys[first & (grouped == "val")].groupby(m["label"]).size()
    for i in m.index[moved]:
        assert grouped[i] == "train" or val_keys[m.at[i, "label"]] == 1
    assert moved.sum() < first.sum() / 4
    per = grouped.groupby([m["label"], grouped]).size().unstack(fill_value=0)
    assert (per["val"] >= 1).all() and (per["train"] >= per.sum(axis=1) / 2).all()
