from pathlib import Path

import numpy as np
import pytest
import torch

from components.backbones import load_backbone
from components.config import DataConfig, ValidationConfig
from components.dataset import scan_dataset
from components.features import (
    CUDA_BATCH,
    PIXELS_PER_CPU_BATCH,
    cache_key,
    extract_features,
    extraction_batch,
)
from components.images import EvalTransform, Preprocessing, open_image


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


def test_features_match_the_network_and_are_cached(
    lite0, digits_root: Path, tmp_path: Path
) -> None:
    m = scan_dataset(digits_root, DataConfig(), ValidationConfig(), 0).head(12)
    prep = Preprocessing(64, (0.5,) * 3, (0.5,) * 3)
    feats = extract_features(lite0, m["path"].tolist(), m["sha256"].tolist(), prep, tmp_path, 8, 0)
    assert set(feats) == set(lite0.cut_points)
    x = torch.stack([EvalTransform(prep)(open_image(p)) for p in m["path"][:3]])
    with torch.no_grad():
        direct = lite0.prefix("block3")(x).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(feats["block3"][:3], direct, rtol=1e-2, atol=1e-2)  # fp16 cache

    folder = tmp_path / cache_key(lite0, prep)
    chunks = sorted(folder.glob("chunk-*.npz"))
    again = extract_features(lite0, m["path"].tolist(), m["sha256"].tolist(), prep, tmp_path, 8, 0)
    assert sorted(folder.glob("chunk-*.npz")) == chunks  # nothing recomputed
    np.testing.assert_array_equal(again["head"], feats["head"])


def test_cache_is_keyed_by_content_and_resolution(lite0, digits_root: Path, tmp_path: Path) -> None:
    m = scan_dataset(digits_root, DataConfig(), ValidationConfig(), 0).head(4)
    small = Preprocessing(64, (0.5,) * 3, (0.5,) * 3)
    large = Preprocessing(96, (0.5,) * 3, (0.5,) * 3)
    assert cache_key(lite0, small) != cache_key(lite0, large)
    renamed = [f"/elsewhere/{i}.png" for i in range(4)]  # same bytes under new names: cache hit
    extract_features(lite0, m["path"].tolist(), m["sha256"].tolist(), small, tmp_path, 4, 0)
    extract_features(lite0, renamed, m["sha256"].tolist(), small, tmp_path, 4, 0)
    assert len(list((tmp_path / cache_key(lite0, small)).glob("chunk-*.npz"))) == 1


def test_extraction_batches_shrink_as_images_grow() -> None:
    cpu = torch.device("cpu")
    sizes = [16, 32, 64, 96, 128, 224, 256, 384, 512, 1024]
    batches = [extraction_batch(s, cpu) for s in sizes]
    assert batches == sorted(batches, reverse=True) and batches[0] == 128 and batches[-1] == 1
    assert all(b & (b - 1) == 0 for b in batches)  # powers of two
    assert (extraction_batch(224, cpu), extraction_batch(64, cpu)) == (8, 64)  # as measured
    for s, b in zip(sizes, batches, strict=True):  # about the same pixels per batch
        assert b == 128 or b == 1 or b * s * s <= PIXELS_PER_CPU_BATCH < 2 * b * s * s
    assert extraction_batch(224, torch.device("cuda")) == CUDA_BATCH
