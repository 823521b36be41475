"""validate_manifest against a real Great Expectations run on small hand-made manifests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from components.common.config import ValidationConfig
from components.common.errors import DataValidationError
from components.data.validation import ValidationReport, validate_manifest

CFG = ValidationConfig(min_images_per_class=3, max_bad_fraction=0.5)


def _row(label: str, name: str, split: str = "train", **overrides: Any) -> dict[str, Any]:
    relpath = f"{split}/{label}/{name}"
    row = {
        "path": f"/data/{relpath}",
        "relpath": relpath,
        "label": label,
        "split": split,
        "bytes": 1234,
        "sha256": hashlib.sha256(relpath.encode()).hexdigest(),
        "format": "PNG",
        "width": 32,
        "height": 32,
        "mode": "RGB",
        "decodable": True,
        "error": "",
    }
    row.update(overrides)
    return row


def _clean(per_class: int = 4, labels: tuple[str, ...] = ("cat", "dog")) -> list[dict[str, Any]]:
    rows = [_row(label, f"{i}.png") for label in labels for i in range(per_class)]
    rows += [_row(label, "v.png", "val") for label in labels]
    return rows


def _validate(rows: list[dict[str, Any]], tmp_path: Path, cfg: ValidationConfig = CFG):
    return validate_manifest(pd.DataFrame(rows), cfg, tmp_path / "out")


def _reasons(report: ValidationReport) -> dict[str, str]:
    return {q.path: q.reason for q in report.quarantined}


def test_clean_dataset_passes_and_writes_evidence(tmp_path: Path) -> None:
    report = _validate(_clean(), tmp_path)

    assert report.passed, report.failures
    assert (report.n_files, report.n_usable, report.quarantined) == (10, 10, ())
    report.raise_if_failed()
    assert all(e.success for e in report.expectations)
    assert len(pd.read_csv(report.usable_manifest_path)) == 10
    saved = json.loads(report.json_path.read_text())
    assert saved["report"]["passed"] is True
    assert saved["great_expectations"]["files"]["success"] is True
    assert report.docs_path is not None and report.docs_path.name == "index.html"
    assert report.docs_path.is_file()
    assert "image-files" in report.docs_path.read_text()


def test_bad_rows_are_quarantined_with_reasons(tmp_path: Path) -> None:
    empty = {"bytes": 0, "format": "", "width": 0, "height": 0, "decodable": False}
    rows = [
        *_clean(per_class=5),
        _row("cat", "trunc.jpg", format="JPEG", decodable=False, error="truncated image"),
        _row("cat", "tiny.png", width=10, height=12),
        _row("dog", "anim.gif", format="GIF"),
        _row("dog", "empty.png", **empty, error="zero-byte file"),
    ]
    cfg = CFG.model_copy(update={"allowed_formats": ("PNG", "JPEG")})
    report = _validate(rows, tmp_path, cfg)

    reasons = _reasons(report)
    assert reasons == {
        "/data/train/cat/trunc.jpg": "not decodable: truncated image",
        "/data/train/cat/tiny.png": "too small: 10x12 < 16x16",
        "/data/train/dog/anim.gif": "format GIF not allowed (allowed: JPEG, PNG)",
        "/data/train/dog/empty.png": "zero-byte file",
    }
    assert report.passed and report.n_usable == 12
    kept = pd.read_csv(report.usable_manifest_path)
    assert list(kept.columns) == list(pd.DataFrame(rows).columns)
    assert not set(kept["path"]) & set(reasons)
    failed = {e.name for e in report.expectations if not e.success}
    assert "expect_column_values_to_be_in_set(decodable)" in failed
    assert "expect_column_values_to_be_between(bytes)" in failed
    markdown = report.to_markdown()
    assert "/data/train/cat/tiny.png" in markdown and "too small" in markdown


def test_duplicate_across_splits_is_leakage(tmp_path: Path) -> None:
    rows = _clean()
    rows.append(_row("cat", "copy.png", "test", sha256=rows[0]["sha256"]))
    rows.append(_row("cat", "again.png", "test", sha256=rows[4 * 2]["sha256"]))  # val cat copy
    report = _validate(rows, tmp_path)

    assert _reasons(report) == {
        "/data/test/cat/copy.png": "duplicate of train file train/cat/0.png (leakage)",
        "/data/test/cat/again.png": "duplicate of val file val/cat/v.png (leakage)",
    }
    unique = next(e for e in report.expectations if e.name.endswith("(sha256)"))
    assert not unique.success and unique.unexpected_count == 4
    assert report.passed


def test_duplicates_within_a_split_keep_the_first(tmp_path: Path) -> None:
    rows = _clean()
    rows.append(_row("cat", "z-copy.png", sha256=rows[1]["sha256"]))
    report = _validate(rows, tmp_path)

    assert _reasons(report) == {"/data/train/cat/z-copy.png": "duplicate of train/cat/1.png"}


def test_same_content_with_two_labels_quarantines_every_copy(tmp_path: Path) -> None:
    rows = _clean()
    rows.append(_row("dog", "mystery.png", sha256=rows[0]["sha256"]))
    report = _validate(rows, tmp_path)

    reasons = _reasons(report)
    assert set(reasons) == {"/data/train/cat/0.png", "/data/train/dog/mystery.png"}
    assert set(reasons.values()) == {"same content labelled cat and dog"}


def test_one_class_fails(tmp_path: Path) -> None:
    report = _validate(_clean(labels=("cat",)), tmp_path)

    assert not report.passed
    assert any("1 class (cat)" in f for f in report.failures)
    with pytest.raises(DataValidationError, match=r"at least 2") as err:
        report.raise_if_failed()
    assert str(report.json_path) in str(err.value)


def test_class_below_minimum_is_named(tmp_path: Path) -> None:
    rows = [*_clean(), _row("bird", "0.png"), _row("bird", "v.png", "val")]
    report = _validate(rows, tmp_path)

    assert report.failures == ("class 'bird' has 1 usable train image, below the minimum of 3",)
    with pytest.raises(DataValidationError, match="'bird' has 1 usable"):
        report.raise_if_failed()


def test_class_missing_from_train_fails(tmp_path: Path) -> None:
    rows = [*_clean(), _row("fox", "v.png", "val")]
    report = _validate(rows, tmp_path)

    assert report.failures == ("class 'fox' appears in val but not in train",)
    contain = next(e for e in report.expectations if "contain_set" in e.name)
    assert not contain.success and "fox" in contain.detail


def test_too_many_bad_files_fails(tmp_path: Path) -> None:
    rows = _clean(per_class=3) + [
        _row("cat", f"bad{i}.jpg", decodable=False, error="cannot identify image file")
        for i in range(4)
    ]
    cfg = CFG.model_copy(update={"max_bad_fraction": 0.2})
    report = _validate(rows, tmp_path, cfg)

    assert report.failures == ("4 of 12 files rejected (33.3%), above the limit 20%",)
    assert "bad0.jpg" in report.to_markdown()


def test_empty_manifest_fails(tmp_path: Path) -> None:
    report = _validate([], tmp_path)

    assert not report.passed and report.failures == ("no images found",)
    with pytest.raises(DataValidationError, match="no images found"):
        report.raise_if_failed()
    assert report.json_path.is_file() and report.usable_manifest_path.is_file()


def test_markdown_lists_first_files_and_counts_the_rest(tmp_path: Path) -> None:
    rows = _clean(per_class=30) + [_row("cat", f"s{i:02}.png", width=4) for i in range(25)]
    report = _validate(rows, tmp_path)

    markdown = report.to_markdown()
    assert "/data/train/cat/s00.png" in markdown and "/data/train/cat/s24.png" not in markdown
    assert "and 5 more" in markdown
