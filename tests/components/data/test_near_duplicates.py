"""Near-duplicates on real photos: altered copies across splits are quarantined from the held-out
side, a copy under another label is a label conflict, distinct photos of a class are left alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.common.config import DataConfig, ValidationConfig
from components.data.contact_sheet import write_contact_sheet
from components.data.near_duplicates import NearDuplicates, candidate_pairs, find_near_duplicates
from components.data.scan import read_manifest, scan_dataset
from components.data.validation import quarantine_more, validate_manifest
from components.engine.backbones import load_backbone
from components.engine.extraction import ExtractionEngine

ANTS_BEES = Path(__file__).parents[2] / "data" / "ants_bees"


def _photos(label: str) -> list[Path]:
    return sorted((ANTS_BEES / label).glob("*.jpg"))


def _save(img: Image.Image, path: Path, quality: int = 92) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=quality)


@pytest.fixture(scope="module")
def leaky(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/{ants,bees}: 6 photos each; val/ants: a JPEG q70 copy and a half-size copy of train
    ants 0 and 1 and a distinct ant; val/bees: a distinct bee; train/bees also holds a q70 copy of
    train ants 2 (the label conflict)."""
    root = tmp_path_factory.mktemp("leaky")
    ants, bees = _photos("ants"), _photos("bees")
    for label, photos in (("ants", ants), ("bees", bees)):
        for i, src in enumerate(photos[:6]):
            _save(Image.open(src), root / "train" / label / f"{i}.jpg")
    _save(Image.open(ants[0]), root / "val" / "ants" / "copy_q70.jpg", quality=70)
    small = Image.open(ants[1])
    _save(small.resize((small.width // 2, small.height // 2)), root / "val" / "ants" / "half.jpg")
    _save(Image.open(ants[10]), root / "val" / "ants" / "distinct.jpg")
    _save(Image.open(bees[10]), root / "val" / "bees" / "distinct.jpg")
    _save(Image.open(ants[2]), root / "train" / "bees" / "mislabelled.jpg", quality=70)
    return root


@pytest.fixture(scope="module")
def searched(leaky: Path, tmp_path_factory: pytest.TempPathFactory):
    """The manifest, its head features (real engine, native preprocessing) and what was found."""
    manifest = scan_dataset(leaky, DataConfig(), ValidationConfig(), 0).reset_index(drop=True)
    backbone = load_backbone("efficientnet_lite0")
    engine = ExtractionEngine(backbone, tmp_path_factory.mktemp("cache"), num_workers=0)
    features = engine.features(
        manifest["path"].tolist(), manifest["sha256"].tolist(), engine.native
    )[backbone.cut_points[-1]]
    return manifest, features, find_near_duplicates(manifest, features, ValidationConfig())


def _names(paths) -> set[str]:
    return {"/".join(Path(p).parts[-3:]) for p in paths}


def test_altered_copies_in_val_are_quarantined_from_val(searched) -> None:
    _, _, found = searched
    assert _names(found.quarantined) == {"val/ants/copy_q70.jpg", "val/ants/half.jpg"}
    for path, reason in found.quarantined.items():
        assert "(leakage)" in reason and "train file" in reason, (path, reason)
    leaks = {(_names([p.first]).pop(), _names([p.second]).pop()) for p in found.leaks}
    assert ("train/ants/0.jpg", "val/ants/copy_q70.jpg") in leaks
    assert ("train/ants/1.jpg", "val/ants/half.jpg") in leaks


def test_distinct_images_of_a_class_are_not_flagged(searched) -> None:
    _, _, found = searched
    flagged = _names([p.first for p in found.pairs] + [p.second for p in found.pairs])
    assert not flagged & {"val/ants/distinct.jpg", "val/bees/distinct.jpg"}
    assert all(Path(p).name != "distinct.jpg" for p in found.quarantined)
    assert len(found.pairs) == 3  # the two leaks and the conflict, nothing else


def test_a_copy_under_another_label_is_a_label_conflict(searched) -> None:
    _, _, found = searched
    (conflict,) = found.label_conflicts
    assert _names([conflict.first, conflict.second]) == {
        "train/ants/2.jpg",
        "train/bees/mislabelled.jpg",
    }
    assert {conflict.first_label, conflict.second_label} == {"ants", "bees"}
    assert not conflict.cross_split and conflict.second not in found.quarantined


def test_the_search_is_deterministic_whatever_the_row_order(searched) -> None:
    manifest, features, found = searched
    again = find_near_duplicates(manifest, features, ValidationConfig())
    order = np.random.default_rng(3).permutation(len(manifest))
    shuffled = find_near_duplicates(
        manifest.iloc[order].reset_index(drop=True), features[order], ValidationConfig()
    )
    assert again == found
    assert shuffled.pairs == found.pairs and shuffled.quarantined == found.quarantined


def test_thresholds_come_from_the_config(searched) -> None:
    manifest, features, _ = searched
    strict = ValidationConfig(near_duplicate_max_distance=0, near_duplicate_min_cosine=0.999)
    assert find_near_duplicates(manifest, features, strict).pairs == ()


def test_candidates_are_nearest_neighbours_above_the_threshold() -> None:
    x = np.array([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [-1.0, 0.0]])
    pairs = candidate_pairs(x, min_cosine=0.9, neighbours=1, block=2)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1)]
    assert candidate_pairs(x[:1], 0.0, 5, 8) == []


def test_quarantine_amends_the_report_manifest_and_json(
    leaky: Path, searched, tmp_path: Path
) -> None:
    manifest, _, found = searched
    report = validate_manifest(manifest, ValidationConfig(), tmp_path / "validation")
    assert report.passed and report.n_usable == len(manifest)
    sheet = write_contact_sheet(
        [
            (p.first, p.second, f"{p.first_label}|{p.second_label}\n{p.describe()}")
            for p in found.pairs
        ],
        tmp_path / "validation" / "near_duplicates.png",
    )
    amended = quarantine_more(
        report, found.quarantined, found.to_dict(sheet), tmp_path / "validation" / "usable2.csv"
    )
    usable = read_manifest(amended.usable_manifest_path)
    assert len(usable) == len(manifest) - 2 == amended.n_usable
    assert not set(usable["path"]) & set(found.quarantined)
    assert len(read_manifest(report.usable_manifest_path)) == len(manifest)  # earlier file kept
    payload = json.loads(amended.json_path.read_text())
    section = payload["report"]["near_duplicates"]
    assert section["n_quarantined"] == 2 and section["n_label_conflicts"] == 1
    assert section["contact_sheet"] == str(sheet) and "great_expectations" in payload
    assert "Contact sheet:" in amended.to_markdown() and "label conflict" in amended.to_markdown()
    with Image.open(sheet) as img:
        assert img.width > 256 and img.height > 128


def test_no_pairs_is_an_empty_report() -> None:
    frame = pd.DataFrame({"path": ["a"], "relpath": ["a"], "label": ["x"], "split": ["train"]})
    found = find_near_duplicates(frame, np.ones((1, 4)), ValidationConfig())
    assert found == NearDuplicates(1, 0, (), {})


def test_images_too_small_to_judge_are_not_searched(searched) -> None:
    manifest, features, _ = searched
    found = find_near_duplicates(
        manifest, features, ValidationConfig(near_duplicate_min_side=10_000)
    )
    assert found.pairs == () and found.n_too_small == len(manifest) and found.n_images == 0
