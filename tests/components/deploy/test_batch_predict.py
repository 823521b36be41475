"""Scoring a folder through the extraction streams: every image, sorted, bad files listed."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from components.common.config import DataConfig, ExportConfig
from components.deploy.batch_predict import image_files, predict_folder
from components.deploy.classifier import OnnxClassifier
from components.deploy.export import export_onnx
from components.engine.images import Preprocessing
from tests.conftest import tiny_classifier, write_photo

LABELS = ["cat", "dog"]
PREP = Preprocessing(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    model = tiny_classifier(len(LABELS))
    return export_onnx(model, torch.randn(4, 3, 32, 32), out, ExportConfig()).onnx_path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "incoming"
    for i in range(11):
        write_photo(root / ("day2" if i % 2 else "day1") / f"{i:02d}.jpg", seed=i)
    write_photo(root / "grey.png", seed=50, mode="L")
    (root / "notes.txt").write_text("not an image, and not an image extension: skipped")
    (root / "day1" / "fake.png").write_bytes(b"this is not a png")
    good = (root / "day1" / "00.jpg").read_bytes()
    (root / "day2" / "cut.jpg").write_bytes(good[: len(good) // 2])  # header fine, pixels not
    return root


def test_image_files_are_every_image_under_the_folder_sorted(folder: Path) -> None:
    files = image_files(folder, DataConfig().extensions)
    assert files == sorted(files) and len(files) == 14
    assert folder / "notes.txt" not in files


def test_predict_folder_scores_good_images_and_lists_bad_ones(
    folder: Path, onnx_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out" / "predictions.csv"
    result = predict_folder(onnx_path, LABELS, PREP, folder, out, DataConfig().extensions)

    assert result.scored == 12 and result.out_csv == out
    bad = dict(result.bad)
    assert set(bad) == {str(folder / "day1" / "fake.png"), str(folder / "day2" / "cut.jpg")}
    assert "UnidentifiedImageError" in bad[str(folder / "day1" / "fake.png")]
    assert "truncated" in bad[str(folder / "day2" / "cut.jpg")]

    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label", "probability", "p_cat", "p_dog"]
    paths = [r["path"] for r in rows]
    assert paths == sorted(paths) and len(paths) == 12
    direct = OnnxClassifier(onnx_path, LABELS, PREP).predict([Path(p) for p in paths])
    for row, want in zip(rows, direct, strict=True):
        probs = np.array([float(row["p_cat"]), float(row["p_dog"])])
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(probs, [want["probabilities"][lab] for lab in LABELS], atol=1e-5)
        assert row["label"] == want["label"]
        assert float(row["probability"]) == pytest.approx(want["score"], abs=1e-5)


def test_an_empty_folder_writes_a_header_only(onnx_path: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "p.csv"
    result = predict_folder(onnx_path, LABELS, PREP, tmp_path / "empty", out, (".png",))
    assert (result.scored, result.bad) == (0, ())
    assert out.read_text().strip() == "path,label,probability,p_cat,p_dog"
