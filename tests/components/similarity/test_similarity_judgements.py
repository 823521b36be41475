"""The similarity judgement on real data shipped with the tests: a sample of the ants/bees photos
(ImageNet images) and of MNIST digit scans (see tests/data/README.md)."""

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from components.common.config import SimilarityConfig, StrategyConfig
from components.engine.backbones import load_backbone
from components.engine.extraction import ExtractionEngine
from components.engine.images import open_image
from components.similarity.corruptions import CORRUPTIONS, SEVERITIES, corrupt, write_corrupted
from components.similarity.scores import score_files

DATA = Path(__file__).resolve().parents[2] / "data"
PHOTOS = sorted(str(p) for p in (DATA / "ants_bees").rglob("*.jpg"))
DIGITS = sorted(str(p) for p in (DATA / "mnist").rglob("*.png"))


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


def _engine(lite0, root: Path) -> ExtractionEngine:
    return ExtractionEngine(lite0, root, torch.device("cpu"), num_workers=0)


def test_ants_and_bees_are_judged_similar_and_mnist_different(lite0, tmp_path: Path) -> None:
    cfg = SimilarityConfig(sample_size=32, bootstrap_rounds=100)
    threshold = StrategyConfig().similar_threshold
    engine = _engine(lite0, tmp_path)
    photos = score_files(engine, PHOTOS, cfg, 0)
    digits = score_files(engine, DIGITS, cfg, 0)
    assert photos.low >= threshold, photos  # similar, and not an uncertain call
    assert digits.high < threshold, digits
    assert digits.mean_kl > 10 * photos.mean_kl  # an order of magnitude apart, not a close call
    # the source classifier agrees: confident on photos, lost on digits
    assert photos.source_max_prob > 2 * digits.source_max_prob


def test_corruptions_are_graded_and_never_touch_the_originals(tmp_path: Path) -> None:
    before = Path(PHOTOS[0]).read_bytes()
    img = open_image(PHOTOS[0])
    pixels = np.asarray(img, dtype=float)
    for kind in CORRUPTIONS:
        change = [
            np.abs(np.asarray(corrupt(img, kind, s), dtype=float) - pixels).mean()
            for s in range(SEVERITIES + 1)
        ]
        assert change[0] == 0 and all(a < b for a, b in pairwise(change))
    write_corrupted(PHOTOS[:2], "blur", 3, tmp_path / "blur")
    assert Path(PHOTOS[0]).read_bytes() == before and len(list(tmp_path.rglob("*.png"))) == 2
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(img, "rain", 1)


@pytest.mark.slow
@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_similarity_falls_as_corruption_grows(lite0, tmp_path: Path, kind: str) -> None:
    cfg = SimilarityConfig(sample_size=len(PHOTOS), bootstrap_rounds=0)
    engine = _engine(lite0, tmp_path / "cache")
    scores = [
        score_files(engine, write_corrupted(PHOTOS, kind, s, tmp_path / f"{kind}{s}"), cfg, 0).score
        for s in range(SEVERITIES + 1)
    ]
    rho = spearmanr(range(SEVERITIES + 1), scores).statistic
    assert rho <= -0.9, (kind, scores)
    assert scores[-1] < scores[0]
