import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from components.backbones import load_backbone
from components.config import SimilarityConfig
from components.similarity import per_image_bn_moments, score_similarity, symmetric_kl


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


def test_symmetric_kl_is_zero_only_for_identical_gaussians() -> None:
    m, v = np.array([0.0, 1.0]), np.array([1.0, 2.0])
    np.testing.assert_allclose(symmetric_kl(m, v, m, v), 0.0)
    assert (symmetric_kl(m, v, m + 1, v) > 0).all() and (symmetric_kl(m, v, m, 2 * v) > 0).all()
    np.testing.assert_allclose(symmetric_kl(m, v, m + 1, 2 * v), symmetric_kl(m + 1, 2 * v, m, v))


def test_digit_scans_are_judged_different_from_imagenet(lite0, digits_root: Path) -> None:
    paths = sorted(str(p) for p in digits_root.rglob("*.png"))
    report = score_similarity(
        lite0, paths, SimilarityConfig(sample_size=32, bootstrap_rounds=50), 0, 0
    )
    assert report.score < 0.5 and report.high < 0.5
    assert report.low <= report.score <= report.high
    assert len(report.layer_kl) == len(report.layer_names) == 49
    # digits differ most near the input: the first layer diverges more than the last ones
    assert report.layer_kl[0] > np.mean(report.layer_kl[-5:])


def test_divergence_vanishes_where_the_stored_statistics_are_the_data_s(
    lite0, digits_root: Path
) -> None:
    """Store the sample's own statistics in the first BN layer: its divergence must drop to ~0."""
    paths = sorted(str(p) for p in digits_root.rglob("*.png"))[:16]
    tuned = copy.deepcopy(lite0)
    names, firsts, seconds, _ = per_image_bn_moments(tuned, paths, tuned.preprocessing, 16, 0)
    first = dict(tuned.model.named_modules())[names[0]]
    mean = firsts[0].mean(axis=0)
    with torch.no_grad():
        first.running_mean.copy_(torch.from_numpy(mean))
        first.running_var.copy_(torch.from_numpy(np.maximum(seconds[0].mean(axis=0) - mean**2, 0)))
    cfg = SimilarityConfig(sample_size=16, bootstrap_rounds=0)
    original = score_similarity(lite0, paths, cfg, 0, 0)
    matched = score_similarity(tuned, paths, cfg, 0, 0)
    assert original.layer_kl[0] > 1.0
    assert matched.layer_kl[0] < 1e-2
