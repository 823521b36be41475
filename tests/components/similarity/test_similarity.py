import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from components.common.config import SimilarityConfig
from components.engine.backbones import load_backbone
from components.engine.extraction import ExtractionEngine
from components.similarity.scores import (
    resampled_divergences,
    sample_moments,
    score_files,
    symmetric_kl,
)


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


def test_symmetric_kl_is_zero_only_for_identical_gaussians() -> None:
    m, v = np.array([0.0, 1.0]), np.array([1.0, 2.0])
    np.testing.assert_allclose(symmetric_kl(m, v, m, v), 0.0)
    assert (symmetric_kl(m, v, m + 1, v) > 0).all() and (symmetric_kl(m, v, m, 2 * v) > 0).all()
    np.testing.assert_allclose(symmetric_kl(m, v, m + 1, 2 * v), symmetric_kl(m + 1, 2 * v, m, v))


def _engine(backbone, root: Path) -> ExtractionEngine:
    return ExtractionEngine(backbone, root, torch.device("cpu"), num_workers=0)


def test_digit_scans_are_judged_different_from_imagenet(
    lite0, digits_root: Path, tmp_path: Path
) -> None:
    paths = sorted(str(p) for p in digits_root.rglob("*.png"))
    cfg = SimilarityConfig(sample_size=32, bootstrap_rounds=50)
    report = score_files(_engine(lite0, tmp_path), paths, cfg, 0)
    assert report.score < 0.5 and report.high < 0.5
    assert report.low <= report.score <= report.high
    assert len(report.layer_kl) == len(report.layer_names) == 49
    # digits differ most near the input: the first layer diverges more than the last ones
    assert report.layer_kl[0] > np.mean(report.layer_kl[-5:])


def test_divergence_vanishes_where_the_stored_statistics_are_the_data_s(
    lite0, digits_root: Path, tmp_path: Path
) -> None:
    """Store the sample's own statistics in the first BN layer: its divergence must drop to ~0."""
    paths = sorted(str(p) for p in digits_root.rglob("*.png"))[:16]
    tuned = copy.deepcopy(lite0)
    shas = [f"{i:064x}" for i in range(len(paths))]
    moments = _engine(lite0, tmp_path / "moments").moments(paths, shas)
    first = dict(tuned.model.named_modules())[moments.names[0]]
    mean = moments.firsts[0].mean(axis=0)
    var = np.maximum(moments.seconds[0].mean(axis=0) - mean**2, 0)
    with torch.no_grad():
        first.running_mean.copy_(torch.from_numpy(mean))
        first.running_var.copy_(torch.from_numpy(var))
    cfg = SimilarityConfig(sample_size=16, bootstrap_rounds=0)
    original = score_files(_engine(lite0, tmp_path / "original"), paths, cfg, 0)
    matched = score_files(_engine(tuned, tmp_path / "tuned"), paths, cfg, 0)
    assert original.layer_kl[0] > 1.0
    assert matched.layer_kl[0] < 1e-2


def test_resampled_divergences_equal_one_resample_at_a_time() -> None:
    rng = np.random.default_rng(0)
    widths = (3, 5, 2)
    firsts = [rng.normal(size=(10, w)) for w in widths]
    seconds = [f**2 + rng.random(f.shape) for f in firsts]
    reference = [(rng.normal(size=w), rng.random(w) + 0.5) for w in widths]
    resamples = [rng.choice(10, 10) for _ in range(4)]
    got = resampled_divergences(reference, firsts, seconds, resamples, 1e-3)
    assert got.shape == (4, 3)
    for row, r in zip(got, resamples, strict=True):
        means, variances = sample_moments(firsts, seconds, r, 1e-3)
        naive = [
            symmetric_kl(m, v, rm, rv + 1e-3).mean()
            for m, v, (rm, rv) in zip(means, variances, reference, strict=True)
        ]
        np.testing.assert_allclose(row, naive, rtol=1e-10)
    assert len({tuple(np.round(row, 8)) for row in got}) > 1  # resamples really differ
