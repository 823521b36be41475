"""BatchNorm moments: the ONNX graph agrees with PyTorch's hooks, and the cache spares a rerun."""

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from components.backbones import load_backbone
from components.bn_moments import (
    CACHE_SUFFIX,
    GRAPH_NAME,
    bn_layers,
    cached_bn_moments,
    per_image_bn_moments,
)
from components.features import cache_key

CPU = torch.device("cpu")
ANTS_BEES = Path(__file__).parents[1] / "data" / "ants_bees"


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def photos() -> tuple[list[str], list[str]]:
    paths = sorted(str(p) for p in ANTS_BEES.rglob("*.jpg"))[:6]
    return paths, [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]


def _folder(root: Path, lite0) -> Path:
    return root / (cache_key(lite0, lite0.preprocessing) + CACHE_SUFFIX)


def test_moments_are_the_batchnorm_inputs_statistics(lite0, photos) -> None:
    paths, _ = photos
    moments = per_image_bn_moments(lite0, paths[:2], 2, 0)
    layers = bn_layers(lite0.model)
    assert moments.names == tuple(n for n, _ in layers)
    assert [f.shape for f in moments.firsts] == [(2, m.num_features) for _, m in layers]
    assert moments.logits.shape == (2, 1000)
    # a mean square is never below the squared mean (Jensen), and activations are not all zero
    for first, second in zip(moments.firsts, moments.seconds, strict=True):
        assert (second >= first**2 - 1e-4 * (1 + second)).all()
    assert np.abs(moments.firsts[0]).max() > 0.01
    assert not any(m._forward_pre_hooks for _, m in layers)  # the shared backbone is left clean


def test_onnx_rows_match_pytorch_and_a_rerun_computes_nothing(
    lite0, photos, tmp_path: Path, caplog
) -> None:
    paths, shas = photos
    reference = per_image_bn_moments(lite0, paths, 3, 0)
    with caplog.at_level(logging.INFO, logger="components.bn_moments"):
        got = cached_bn_moments(lite0, paths, shas, tmp_path, 3, 0, CPU, "onnxruntime")
    assert "6 to compute (onnxruntime)" in caplog.text
    folder = _folder(tmp_path, lite0)
    assert (folder / GRAPH_NAME).is_file()  # ONNX Runtime really ran
    for ours, theirs in zip(
        (*got.firsts, *got.seconds, got.logits),
        (*reference.firsts, *reference.seconds, reference.logits),
        strict=True,
    ):
        np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3)

    chunks = sorted(folder.glob("chunk-*.npz"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="components.bn_moments"):
        again = cached_bn_moments(lite0, paths[::-1], shas[::-1], tmp_path, 3, 0, CPU)
    assert "0 to compute" in caplog.text
    assert sorted(folder.glob("chunk-*.npz")) == chunks
    np.testing.assert_array_equal(again.logits, got.logits[::-1])


def test_the_pytorch_engine_fills_the_same_cache(lite0, photos, tmp_path: Path) -> None:
    paths, shas = photos
    by_torch = cached_bn_moments(lite0, paths[:2], shas[:2], tmp_path, 2, 0, CPU, "torch")
    assert not (_folder(tmp_path, lite0) / GRAPH_NAME).exists()
    reference = per_image_bn_moments(lite0, paths[:2], 2, 0)
    np.testing.assert_allclose(by_torch.seconds[-1], reference.seconds[-1], rtol=1e-5)
