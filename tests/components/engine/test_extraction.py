"""The extraction engine: features cached by content, two engines that agree, streams in order."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import UnidentifiedImageError

from components.engine import onnx_graphs
from components.engine.cache import cache_key
from components.engine.extraction import (
    CUDA_BATCH,
    FEATURES,
    PIXELS_PER_CPU_BATCH,
    ExtractionEngine,
    choose_engine,
    extraction_batch,
    run_streams,
    stream_plan,
)
from components.engine.images import EvalTransform, Preprocessing, open_image
from components.engine.onnx_graphs import available_cpus, feature_session

CPU = torch.device("cpu")
PREP = Preprocessing(64, (0.5,) * 3, (0.5,) * 3)


def _engine(lite0, root: Path, kind: str = "auto") -> ExtractionEngine:
    return ExtractionEngine(lite0, root, CPU, kind, num_workers=0)


def _extract(lite0, images, root: Path, kind: str) -> dict[str, np.ndarray]:
    paths, shas = images
    return _engine(lite0, root, kind).features(paths, shas, PREP)


def _chunks(root: Path, lite0, prep: Preprocessing = PREP) -> list[Path]:
    return sorted((root / cache_key(lite0, prep)).glob("chunk-*.npz"))


@pytest.fixture(scope="module")
def by_engine(lite0, images, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One cache root filled by each engine, from the same decoded images."""
    roots = {}
    for kind in ("onnxruntime", "torch"):
        roots[kind] = tmp_path_factory.mktemp(kind)
        _extract(lite0, images, roots[kind], kind)
    return roots


def test_features_match_the_network_and_are_cached(lite0, images, tmp_path: Path) -> None:
    paths, shas = images
    engine = _engine(lite0, tmp_path)
    feats = engine.features(paths, shas, PREP)
    assert set(feats) == set(lite0.cut_points)
    x = torch.stack([EvalTransform(PREP)(open_image(p)) for p in paths[:3]])
    with torch.no_grad():
        direct = lite0.prefix("block3")(x).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(feats["block3"][:3], direct, rtol=1e-2, atol=1e-2)  # fp16 cache

    chunks = _chunks(tmp_path, lite0)
    again = _engine(lite0, tmp_path).features(paths, shas, PREP)  # a new engine reads the disk
    assert _chunks(tmp_path, lite0) == chunks  # nothing recomputed
    np.testing.assert_array_equal(again["head"], feats["head"])


def test_cache_is_keyed_by_content_and_resolution(lite0, images, tmp_path: Path) -> None:
    paths, shas = images
    large = Preprocessing(96, (0.5,) * 3, (0.5,) * 3)
    assert cache_key(lite0, PREP) != cache_key(lite0, large)
    renamed = [f"/elsewhere/{i}.png" for i in range(len(paths))]  # same bytes, new names: a hit
    engine = _engine(lite0, tmp_path)
    engine.features(paths, shas, PREP)
    engine.features(renamed, shas, PREP)
    assert len(_chunks(tmp_path, lite0)) == 1


def test_extraction_batches_shrink_as_images_grow() -> None:
    sizes = [16, 32, 64, 96, 128, 224, 256, 384, 512, 1024]
    batches = [extraction_batch(s, CPU) for s in sizes]
    assert batches == sorted(batches, reverse=True) and batches[0] == 128 and batches[-1] == 1
    assert all(b & (b - 1) == 0 for b in batches)  # powers of two
    assert (extraction_batch(224, CPU), extraction_batch(64, CPU)) == (8, 64)  # as measured
    for s, b in zip(sizes, batches, strict=True):  # about the same pixels per batch
        assert b == 128 or b == 1 or b * s * s <= PIXELS_PER_CPU_BATCH < 2 * b * s * s
    assert extraction_batch(224, torch.device("cuda")) == CUDA_BATCH


def test_onnxruntime_features_equal_pytorch_features(lite0, images, by_engine) -> None:
    folder = by_engine["onnxruntime"] / cache_key(lite0, PREP)
    assert (folder / FEATURES.file_name).is_file()  # the ONNX engine really ran
    assert not (by_engine["torch"] / cache_key(lite0, PREP) / FEATURES.file_name).exists()
    ort = _extract(lite0, images, by_engine["onnxruntime"], "onnxruntime")
    ref = _extract(lite0, images, by_engine["torch"], "torch")
    for cut in lite0.cut_points:
        assert ort[cut].shape == ref[cut].shape == (len(images[0]), lite0.channels(cut))
        np.testing.assert_allclose(ort[cut], ref[cut], rtol=1e-2, atol=1e-2)  # fp16 cache
    assert np.abs(ort["head"]).max() > 0.1  # real activations, not zeros on both sides


def test_the_graph_is_exported_once_and_reused(lite0, images, by_engine) -> None:
    folder = by_engine["onnxruntime"] / cache_key(lite0, PREP)
    path = folder / FEATURES.file_name
    before = path.stat()
    paths, shas = images
    _engine(lite0, by_engine["onnxruntime"], "onnxruntime").features(
        [*paths, *paths[:1]], [*shas, "0" * 64], PREP
    )  # one new image: the graph runs again, from the same file
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("chunk-")) == [
        FEATURES.file_name
    ]  # no temporary export left behind


@pytest.mark.parametrize(
    ("filled_by", "read_by"), [("torch", "onnxruntime"), ("onnxruntime", "torch")]
)
def test_engines_read_each_others_cache(lite0, images, by_engine, filled_by, read_by) -> None:
    root = by_engine[filled_by]
    chunks = _chunks(root, lite0)
    extractor = (root / cache_key(lite0, PREP) / FEATURES.file_name).exists()
    got = _extract(lite0, images, root, read_by)
    assert _chunks(root, lite0) == chunks  # nothing recomputed
    # Nothing to compute, so the ONNX engine did not even export its graph.
    assert (root / cache_key(lite0, PREP) / FEATURES.file_name).exists() == extractor
    own = _extract(lite0, images, root, filled_by)
    for cut in lite0.cut_points:
        np.testing.assert_array_equal(got[cut], own[cut])


def test_a_graph_that_disagrees_falls_back_to_pytorch(
    lite0, images, by_engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    monkeypatch.setattr(onnx_graphs, "PARITY_RTOL", 0.0)  # no float graph matches exactly
    with caplog.at_level(logging.WARNING, logger="components.engine.extraction"):
        got = _extract(lite0, images, tmp_path, "onnxruntime")
    assert "computing its rows with PyTorch" in caplog.text
    folder = tmp_path / cache_key(lite0, PREP)
    assert not list(folder.glob("*.onnx"))  # the rejected graph was not kept
    ref = _extract(lite0, images, by_engine["torch"], "torch")
    np.testing.assert_array_equal(got["head"], ref["head"])  # same engine, same rows


def test_engine_choice_and_session_placement(lite0, by_engine) -> None:
    assert choose_engine("auto", CPU) == "onnxruntime"
    assert choose_engine("auto", torch.device("cuda")) == "torch"
    assert choose_engine("torch", CPU) == "torch"
    with pytest.raises(ValueError, match="unknown feature engine"):
        choose_engine("tensorrt", CPU)
    path = by_engine["onnxruntime"] / cache_key(lite0, PREP) / FEATURES.file_name
    session = feature_session(path, CPU)
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert session.get_session_options().intra_op_num_threads == available_cpus()


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
    assert stream_plan(n_images, batch, cpus) == plan


def test_streams_return_rows_in_input_order(lite0, images, by_engine, tmp_path: Path) -> None:
    paths, _ = images
    path = by_engine["onnxruntime"] / cache_key(lite0, PREP) / FEATURES.file_name
    session = feature_session(path, CPU)
    one_batch = run_streams(session, paths, PREP, len(paths), 1, np.float32)
    streamed = run_streams(session, paths, PREP, 3, 3, np.float32)
    assert (
        streamed.shape
        == one_batch.shape
        == (len(paths), sum(map(lite0.channels, lite0.cut_points)))
    )
    np.testing.assert_allclose(streamed, one_batch, rtol=1e-4, atol=1e-4)
    assert np.abs(np.diff(one_batch, axis=0)).max() > 0.1  # rows differ, so order is tested
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(UnidentifiedImageError, match=r"notes\.png"):
        run_streams(session, [*paths, str(tmp_path / "notes.png")], PREP, 3, 2)


def test_predict_runs_a_trained_model_over_files(lite0, images, tmp_path: Path) -> None:
    paths, _ = images
    model = torch.nn.Sequential(lite0.prefix("block1"), torch.nn.AdaptiveAvgPool2d(1))
    got = _engine(lite0, tmp_path).predict(model, paths[:3], PREP, batch_size=2)
    x = torch.stack([EvalTransform(PREP)(open_image(p)) for p in paths[:3]])
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_progress_spans_both_passes_and_ends_at_one(lite0, images, tmp_path: Path) -> None:
    paths, shas = images
    heard: list[float] = []
    engine = _engine(lite0, tmp_path)
    engine.batch_size = engine.moments_batch_size = 2  # several batches in each pass
    engine.features(
        paths, shas, PREP, moments_for=shas[:4], on_progress=lambda f, *_: heard.append(f)
    )
    assert heard == sorted(heard)  # one fraction over both passes, never going back
    assert heard[-1] == 1.0
    assert 0.4 in heard  # the moments pass (4 of 10 images) ends at its share
    heard.clear()
    engine.features(paths, shas, PREP, on_progress=lambda f, *_: heard.append(f))
    assert heard == [1.0]  # all cached: done at once


def test_rows_another_engine_cached_are_read_after_a_refresh(lite0, images, tmp_path: Path) -> None:
    """The flow's engine and a worker's share a cache folder: what the worker adds is computed
    once, read back on ``refresh`` and never computed again by the flow's engine."""
    paths, shas = images
    flow_engine = _engine(lite0, tmp_path, "onnxruntime")
    assert flow_engine.missing_features(shas, PREP) == shas
    flow_engine.prepare(PREP)
    assert (tmp_path / cache_key(lite0, PREP) / FEATURES.file_name).is_file()
    worker = ExtractionEngine(lite0, tmp_path, CPU, "onnxruntime", num_workers=0, cpus=1)
    worker.features(paths[:6], shas[:6], PREP)
    assert flow_engine.missing_features(shas, PREP) == shas  # not seen until refreshed
    assert flow_engine.refresh(PREP) == 6
    assert flow_engine.refresh(PREP) == 0  # each chunk is read once
    assert flow_engine.missing_features(shas, PREP) == shas[6:]
    before = set(_chunks(tmp_path, lite0))
    feats = flow_engine.features(paths, shas, PREP)
    assert len(set(_chunks(tmp_path, lite0)) - before) == 1  # only the last four computed
    alone = _engine(lite0, tmp_path / "alone", "onnxruntime").features(paths, shas, PREP)
    for cut in feats:
        np.testing.assert_array_equal(feats[cut], alone[cut])
