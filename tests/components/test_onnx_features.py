import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import UnidentifiedImageError

from components import onnx_features
from components.backbones import load_backbone
from components.config import DataConfig, ValidationConfig
from components.dataset import scan_dataset
from components.features import cache_key, choose_engine, extract_features
from components.images import Preprocessing
from components.onnx_features import FILE_NAME, extractor_onnx, feature_session

CPU = torch.device("cpu")
PREP = Preprocessing(64, (0.5,) * 3, (0.5,) * 3)


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def images(digits_root: Path) -> tuple[list[str], list[str]]:
    m = scan_dataset(digits_root, DataConfig(), ValidationConfig(), 0).head(10)
    return m["path"].tolist(), m["sha256"].tolist()


def _extract(lite0, images, root: Path, engine: str) -> dict[str, np.ndarray]:
    paths, shas = images
    return extract_features(lite0, paths, shas, PREP, root, 4, 0, CPU, engine=engine)


@pytest.fixture(scope="module")
def by_engine(lite0, images, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One cache root filled by each engine, from the same decoded images."""
    roots = {}
    for engine in ("onnxruntime", "torch"):
        roots[engine] = tmp_path_factory.mktemp(engine)
        _extract(lite0, images, roots[engine], engine)
    return roots


def _chunks(root: Path, lite0) -> list[Path]:
    return sorted((root / cache_key(lite0, PREP)).glob("chunk-*.npz"))


def test_onnxruntime_features_equal_pytorch_features(lite0, images, by_engine) -> None:
    folder = by_engine["onnxruntime"] / cache_key(lite0, PREP)
    assert (folder / FILE_NAME).is_file()  # the ONNX engine really ran
    assert not (by_engine["torch"] / cache_key(lite0, PREP) / FILE_NAME).exists()
    ort = _extract(lite0, images, by_engine["onnxruntime"], "onnxruntime")
    ref = _extract(lite0, images, by_engine["torch"], "torch")
    assert set(ort) == set(lite0.cut_points)
    for cut in lite0.cut_points:
        assert ort[cut].shape == ref[cut].shape == (len(images[0]), lite0.channels(cut))
        np.testing.assert_allclose(ort[cut], ref[cut], rtol=1e-2, atol=1e-2)  # fp16 cache
    assert np.abs(ort["head"]).max() > 0.1  # real activations, not zeros on both sides


def test_extractor_is_exported_once_and_reused(lite0, by_engine) -> None:
    folder = by_engine["onnxruntime"] / cache_key(lite0, PREP)
    path = folder / FILE_NAME
    before = path.stat()
    assert extractor_onnx(lite0, PREP, folder) == path
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("chunk-")) == [
        FILE_NAME
    ]  # no temporary export left behind


@pytest.mark.parametrize(
    ("filled_by", "read_by"), [("torch", "onnxruntime"), ("onnxruntime", "torch")]
)
def test_engines_read_each_others_cache(lite0, images, by_engine, filled_by, read_by) -> None:
    root = by_engine[filled_by]
    chunks = _chunks(root, lite0)
    extractor = (root / cache_key(lite0, PREP) / FILE_NAME).exists()
    got = _extract(lite0, images, root, read_by)
    assert _chunks(root, lite0) == chunks  # nothing recomputed
    # Nothing to compute, so the ONNX engine did not even export its graph.
    assert (root / cache_key(lite0, PREP) / FILE_NAME).exists() == extractor
    own = _extract(lite0, images, root, filled_by)
    for cut in lite0.cut_points:
        np.testing.assert_array_equal(got[cut], own[cut])


def test_a_graph_that_disagrees_falls_back_to_pytorch(
    lite0, images, by_engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    monkeypatch.setattr(onnx_features, "PARITY_RTOL", 0.0)  # no float graph matches exactly
    with caplog.at_level(logging.WARNING, logger="components.features"):
        got = _extract(lite0, images, tmp_path, "onnxruntime")
    assert "computing features with PyTorch" in caplog.text
    folder = tmp_path / cache_key(lite0, PREP)
    assert not (folder / FILE_NAME).exists()
    assert not list(folder.glob("*.onnx"))  # the rejected graph was not kept
    ref = _extract(lite0, images, by_engine["torch"], "torch")
    np.testing.assert_array_equal(got["head"], ref["head"])  # same engine, same rows


def test_engine_choice_and_session_placement(lite0, by_engine) -> None:
    assert choose_engine("auto", CPU) == "onnxruntime"
    assert choose_engine("auto", torch.device("cuda")) == "torch"
    assert choose_engine("torch", CPU) == "torch"
    with pytest.raises(ValueError, match="unknown feature engine"):
        choose_engine("tensorrt", CPU)
    session = feature_session(by_engine["onnxruntime"] / cache_key(lite0, PREP) / FILE_NAME, CPU)
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert session.get_session_options().intra_op_num_threads == onnx_features.available_cpus()


@pytest.mark.parametrize(
    ("n_images", "batch", "cpus", "plan"),
    [
        (400, 32, 2, (2, 1)),  # this machine: one single-threaded stream per CPU
        (10, 32, 16, (1, 16)),  # one batch: all CPUs to its ONNX Runtime threads
        (70, 32, 16, (3, 5)),  # three batches share sixteen CPUs
        (10_000, 32, 16, (16, 1)),
        (0, 32, 2, (1, 2)),
    ],
)
def test_stream_plan_uses_every_cpu_without_idle_streams(
    n_images: int, batch: int, cpus: int, plan: tuple[int, int]
) -> None:
    assert onnx_features.stream_plan(n_images, batch, cpus) == plan


def test_streams_return_rows_in_input_order(lite0, images, by_engine, tmp_path: Path) -> None:
    paths, _ = images
    session = feature_session(by_engine["onnxruntime"] / cache_key(lite0, PREP) / FILE_NAME, CPU)
    one_batch = onnx_features.run_streams(session, paths, PREP, len(paths), 1, np.float32)
    streamed = onnx_features.run_streams(session, paths, PREP, 3, 3, np.float32)
    assert (
        streamed.shape
        == one_batch.shape
        == (len(paths), sum(map(lite0.channels, lite0.cut_points)))
    )
    np.testing.assert_allclose(streamed, one_batch, rtol=1e-4, atol=1e-4)
    assert np.abs(np.diff(one_batch, axis=0)).max() > 0.1  # rows differ, so order is tested
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(UnidentifiedImageError, match=r"notes\.png"):
        onnx_features.run_streams(session, [*paths, str(tmp_path / "notes.png")], PREP, 3, 2)
