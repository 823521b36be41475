"""BatchNorm moments come from the same pass as the features, agree across engines and are cached."""

import logging
from pathlib import Path

import numpy as np
import torch

from components.engine.cache import MOMENTS_SUFFIX, cache_key
from components.engine.extraction import FEATURES, FEATURES_AND_MOMENTS, ExtractionEngine
from components.engine.images import EvalTransform, open_image
from components.engine.passes import BnMoments, bn_layers

CPU = torch.device("cpu")


def _reference(lite0, paths: list[str]) -> BnMoments:
    """The moments straight from PyTorch hooks on the backbone's own forward."""
    seen: list[torch.Tensor] = []
    layers = bn_layers(lite0.model)
    hooks = [m.register_forward_pre_hook(lambda _m, i: seen.append(i[0])) for _, m in layers]
    x = torch.stack([EvalTransform(lite0.preprocessing)(open_image(p)) for p in paths])
    try:
        with torch.no_grad():
            logits = lite0.model(x).numpy()
    finally:
        for h in hooks:
            h.remove()
    firsts = tuple(s.mean(dim=(2, 3)).numpy() for s in seen)
    seconds = tuple((s * s).mean(dim=(2, 3)).numpy() for s in seen)
    return BnMoments(tuple(n for n, _ in layers), firsts, seconds, logits)


def _assert_close(got: BnMoments, expected: BnMoments, tol: float) -> None:
    assert got.names == expected.names
    for ours, theirs in zip(
        (*got.firsts, *got.seconds, got.logits),
        (*expected.firsts, *expected.seconds, expected.logits),
        strict=True,
    ):
        np.testing.assert_allclose(ours, theirs, rtol=tol, atol=tol)


def test_moments_are_the_batchnorm_inputs_statistics(lite0, photos, tmp_path: Path) -> None:
    paths, shas = photos
    engine = ExtractionEngine(lite0, tmp_path, CPU, "torch", num_workers=0)
    moments = engine.moments(paths[:2], shas[:2])
    layers = bn_layers(lite0.model)
    assert [f.shape for f in moments.firsts] == [(2, m.num_features) for _, m in layers]
    assert moments.logits.shape == (2, 1000)
    # a mean square is never below the squared mean (Jensen), and activations are not all zero
    for first, second in zip(moments.firsts, moments.seconds, strict=True):
        assert (second >= first**2 - 1e-4 * (1 + second)).all()
    assert np.abs(moments.firsts[0]).max() > 0.01
    _assert_close(moments, _reference(lite0, paths[:2]), 1e-3)
    assert not any(m._forward_pre_hooks for _, m in layers)  # the shared backbone is left clean


def test_one_pass_gives_features_and_moments_and_a_rerun_computes_nothing(
    lite0, photos, tmp_path: Path, caplog
) -> None:
    paths, shas = photos
    native = lite0.preprocessing
    engine = ExtractionEngine(lite0, tmp_path, CPU, "onnxruntime", num_workers=0)
    with caplog.at_level(logging.INFO, logger="components.engine.extraction"):
        feats = engine.features(paths, shas, native, moments_for=shas[:4])
    assert "6 to compute (4 with BatchNorm moments)" in caplog.text
    folder = tmp_path / cache_key(lite0, native)
    # the four sampled images ran through the moments graph only, the other two the fused one
    assert (folder / FEATURES_AND_MOMENTS.file_name).is_file()
    assert (folder / FEATURES.file_name).is_file()
    moments_folder = tmp_path / (cache_key(lite0, native) + MOMENTS_SUFFIX)
    chunks = sorted(tmp_path.rglob("chunk-*.npz"))

    caplog.clear()
    fresh = ExtractionEngine(lite0, tmp_path, CPU, "onnxruntime", num_workers=0)
    with caplog.at_level(logging.INFO, logger="components.engine.extraction"):
        got = fresh.moments(paths[:4][::-1], shas[:4][::-1])
    assert "0 to compute" in caplog.text
    assert sorted(tmp_path.rglob("chunk-*.npz")) == chunks  # read, not recomputed
    assert len(list(moments_folder.glob("chunk-*.npz"))) == 1
    _assert_close(got, _reference(lite0, paths[:4][::-1]), 1e-3)

    # the features of the moments pass are the fused graph's features
    by_fused = ExtractionEngine(lite0, tmp_path / "fused", CPU, "onnxruntime", num_workers=0)
    reference = by_fused.features(paths, shas, native)
    for cut in lite0.cut_points:
        np.testing.assert_allclose(feats[cut], reference[cut], rtol=1e-2, atol=1e-2)


def test_the_pytorch_engine_fills_the_same_cache(lite0, photos, tmp_path: Path) -> None:
    paths, shas = photos
    by_torch = ExtractionEngine(lite0, tmp_path, CPU, "torch", num_workers=0)
    moments = by_torch.moments(paths[:2], shas[:2])
    assert not list(tmp_path.rglob("*.onnx"))
    by_ort = ExtractionEngine(lite0, tmp_path, CPU, "onnxruntime", num_workers=0)
    again = by_ort.moments(paths[:2], shas[:2])
    assert not list(tmp_path.rglob("*.onnx"))  # a cache hit needs no graph
    np.testing.assert_array_equal(again.seconds[-1], moments.seconds[-1])
