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
from components.data.near_duplicates import (
    NearDuplicatePair,
    NearDuplicates,
    candidate_pairs,
    copy_groups,
    find_near_duplicates,
    place_copies,
    regroup,
    with_splits,
)
from components.data.scan import assign_splits, read_manifest, scan_dataset
from components.data.validation import _near_duplicate_lines, quarantine_more, validate_manifest
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


def _pair(a: str, b: str, splits: dict[str, str], cosine: float = 0.99, labels: str = "xx"):
    return NearDuplicatePair(a, b, splits[a], splits[b], labels[0], labels[1], cosine, 2)


def test_copy_groups_grow_from_the_closest_pairs_and_stop_at_their_size() -> None:
    splits = dict.fromkeys(["a", "b", "c", "d", "e", "f", "g"], "train")
    chain = (
        _pair("a", "b", splits, 0.99),
        _pair("c", "d", splits, 0.98),
        _pair("b", "c", splits, 0.90),  # the weakest link of the chain a-b-c-d
        _pair("e", "f", splits, 0.97),
        _pair("f", "g", splits, 0.96, labels="xy"),  # across labels: joins nothing
    )
    assert copy_groups(chain, max_size=3) == {
        "a": "a",
        "b": "a",
        "c": "c",
        "d": "c",
        "e": "e",
        "f": "e",
    }
    assert set(copy_groups(chain, max_size=4).values()) == {"a", "e"}  # the chain fits whole
    assert copy_groups((), max_size=8) == {}


def _drawn(n_per_class: int) -> pd.DataFrame:
    """Two classes of files named as a folder of class folders would give them."""
    rows = [
        {"path": f"/d/{c}/{i:03d}.png", "relpath": f"{c}/{i:03d}.png", "label": c}
        for c in ("a", "b")
        for i in range(n_per_class)
    ]
    frame = pd.DataFrame(rows)
    return frame.assign(split=assign_splits(frame, DataConfig(), 0))


def test_regroup_puts_each_group_whole_in_one_split_and_moves_nothing_else() -> None:
    manifest = _drawn(40)
    split = dict(zip(manifest["path"], manifest["split"], strict=True))
    by_split = {
        s: sorted(p for p, where in split.items() if where == s and "/a/" in p)
        for s in split.values()
    }
    # a group of five copies drawn across all three splits, and a copy across labels
    group = by_split["train"][:2] + by_split["val"][:2] + by_split["test"][:1]
    pairs = tuple(_pair(group[0], other, split) for other in group[1:])
    conflict = _pair(by_split["train"][5], "/d/b/000.png", split, 0.95, labels="ab")
    found = NearDuplicates(len(manifest), 10, (*pairs, conflict), {})
    regrouped = regroup(manifest, found, DataConfig(), 0, max_size=8)
    after = split | regrouped.moves
    assert len({after[p] for p in group}) == 1  # whole, in the split of its first file by path
    assert after[group[0]] == split[min(group)]
    assert set(regrouped.moves) <= set(group)  # no file outside a group moves
    assert regrouped.n_groups == 1 and regrouped.largest_group == 5
    within = [p for p in regrouped.found.pairs if not p.label_conflict]
    assert not any(p.cross_split for p in within)
    # the label conflict stays a conflict, and is quarantined from its held-out side if it crosses
    crossing = split[conflict.first] != split[conflict.second]
    held_out = conflict.second if split[conflict.second] != "train" else conflict.first
    assert (held_out in regrouped.found.quarantined) == crossing
    assert all(p.second_split != "train" or not p.cross_split for p in regrouped.found.pairs)
    line = f"{len(regrouped.moves)} files moved so that each of 1 groups"
    assert line in " ".join(_near_duplicate_lines(regrouped.section(None)))


def test_regroup_is_deterministic_and_keeps_a_copy_free_split() -> None:
    manifest = _drawn(30)
    none = regroup(manifest, NearDuplicates(len(manifest), 0, (), {}), DataConfig(), 0, 8)
    assert none.moves == {} and none.n_groups == 0 and none.found.quarantined == {}
    split = dict(zip(manifest["path"], manifest["split"], strict=True))
    paths = manifest["path"].tolist()
    pairs = tuple(_pair(paths[i], paths[i + 1], split) for i in range(0, 20, 2))
    found = NearDuplicates(len(manifest), 10, pairs, {})
    first = regroup(manifest, found, DataConfig(), 0, 8)
    assert regroup(manifest, found, DataConfig(), 0, 8) == first


def test_copies_move_only_where_the_pipeline_drew_the_splits() -> None:
    manifest = _drawn(40)
    split = dict(zip(manifest["path"], manifest["split"], strict=True))
    train = sorted(p for p, s in split.items() if s == "train" and "/a/" in p)
    val = sorted(p for p, s in split.items() if s == "val" and "/a/" in p)
    found = NearDuplicates(len(manifest), 1, (_pair(train[0], val[0], split),), {})
    found = with_splits(found, split)  # the held-out side quarantined, as the search leaves it
    cfg = ValidationConfig()
    users = place_copies(manifest, found, cfg, DataConfig(), 0, drawn=False)
    assert users.moves == {} and set(users.found.quarantined) == {val[0]}
    assert users.groups[train[0]] == users.groups[val[0]]  # keyed for the folds all the same
    drawn = place_copies(manifest, found, cfg, DataConfig(), 0, drawn=True)
    assert drawn.moves and drawn.found.quarantined == {}
    off = cfg.model_copy(update={"near_duplicate_regroup": False})
    assert place_copies(manifest, found, off, DataConfig(), 0, drawn=True).moves == {}
