from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from components.common.config import DataConfig, SimilarityConfig, ValidationConfig
from components.data.scan import scan_dataset
from components.engine.backbones import load_backbone
from components.engine.extraction import ExtractionEngine
from components.engine.images import Preprocessing
from components.similarity.domain_profile import (
    PROFILE_CUT,
    build_profile,
    compare_to_profile,
    frechet_distance,
    load_profile,
    save_profile,
)
from components.similarity.scores import sample_rows, score_files
from components.training.models import ModelSpec, build_model, save_model

DATA = Path(__file__).resolve().parents[2] / "data"


def test_frechet_distance_matches_the_matrix_square_root_formula() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 20)), rng.normal(size=(200, 20)) * 1.5 + 0.3
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = a.mean(0) - b.mean(0)
    expected = diff @ diff + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a.mean(0), ca, b.mean(0), cb) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a.mean(0), ca, a.mean(0), ca) == pytest.approx(0.0, abs=1e-6)


def test_profile_round_trips_through_its_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 8))
    bn = (rng.random(4), rng.random(6))
    profile = build_profile(x, ["a"] * 400 + ["b"] * 200, "lite", None, 64, ("l0", "l1"), bn, bn, 0)
    loaded = load_profile(save_profile(profile, tmp_path / "profile"))
    assert loaded.class_counts == {"a": 400, "b": 200} and loaded.n_images == 600
    assert len(loaded.sample) == 512  # capped
    np.testing.assert_allclose(loaded.mean, profile.mean)
    np.testing.assert_allclose(loaded.cov, profile.cov, rtol=1e-5)
    np.testing.assert_allclose(loaded.bn_var[1], bn[1])
    assert loaded.bandwidth == pytest.approx(profile.bandwidth)


def test_mmd_separates_a_shifted_distribution_from_a_fresh_sample_of_the_same() -> None:
    rng = np.random.default_rng(2)
    profile = build_profile(rng.normal(size=(800, 16)), ["a"] * 800, "m", None, 64, (), (), (), 0)
    resamples = [rng.choice(100, 100) for _ in range(50)]
    same = compare_to_profile(rng.normal(size=(100, 16)), profile, 0.05, resamples)
    shifted = compare_to_profile(rng.normal(size=(100, 16)) + 1.0, profile, 0.05, resamples)
    assert abs(same.mmd2) < 0.02 and same.score > 0.6
    assert shifted.mmd2 > 0.1 and shifted.score < 0.1
    assert shifted.frechet_per_dim > 5 * max(same.frechet_per_dim, 1e-3)
    # the bootstrap spread brackets the point estimate instead of drifting away from it
    low, high = np.percentile(same.boot_scores, [5, 95])
    assert low <= same.score + 0.05 and high >= same.score - 0.05


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


def _embed(lite0, folder: Path, size: int, cache: Path):
    manifest = scan_dataset(folder, DataConfig(), ValidationConfig(), 0)
    prep = Preprocessing(size, (0.5,) * 3, (0.5,) * 3)
    engine = ExtractionEngine(lite0, cache, torch.device("cpu"), num_workers=0)
    feats = engine.features(manifest["path"].tolist(), manifest["sha256"].tolist(), prep)
    return feats[PROFILE_CUT], manifest


def test_a_stored_profile_knows_its_own_data_from_another_dataset(
    lite0, digits_root: Path, tmp_path: Path
) -> None:
    """A profile of half the digits judges the other half similar and ant/bee photos different."""
    x, manifest = _embed(lite0, digits_root, 64, tmp_path)
    first_half = (manifest["path"].str.extract(r"(\d+)\.png$")[0].astype(int) % 2 == 0).to_numpy()
    labels = manifest["label"][first_half].tolist()
    profile = build_profile(x[first_half], labels, "efficientnet_lite0", None, 64, (), (), (), 0)
    cfg = SimilarityConfig()
    rng = np.random.default_rng(0)
    fresh = x[~first_half][:64]
    photos, _ = _embed(lite0, DATA / "ants_bees", 64, tmp_path)

    def resamples(n: int) -> list[np.ndarray]:
        return [rng.choice(n, n) for _ in range(50)]

    same = compare_to_profile(fresh, profile, cfg.mmd_scale, resamples(len(fresh)))
    other = compare_to_profile(photos, profile, cfg.mmd_scale, resamples(len(photos)))
    assert same.score > 0.5 > other.score
    assert other.frechet_per_dim > 3 * same.frechet_per_dim


def test_a_fine_tuned_model_becomes_the_base_of_a_run_with_its_profile(
    lite0, digits_root: Path, tmp_path: Path
) -> None:
    spec = ModelSpec("efficientnet_lite0", 3, None, 10, "pretrained", 64)
    model = build_model(spec, lite0)
    with torch.no_grad():  # as if fine-tuning had moved the first BN layer's statistics
        model.bn1.running_mean.add_(1.0)
    path = save_model(model, spec, [str(d) for d in range(10)], tmp_path / "run" / "model.pt")
    x, manifest = _embed(lite0, digits_root, 64, tmp_path / "cache")
    profile = build_profile(
        x, manifest["label"].tolist(), "efficientnet_lite0", None, 64, (), (), (), 0
    )
    save_profile(profile, tmp_path / "run" / "profile")

    base = load_backbone(f"model:{path}")
    assert base.profile_dir == tmp_path / "run" / "profile"
    assert base.model.get_classifier().out_features == 10  # its own classifier, not ImageNet's
    assert torch.equal(base.model.bn1.running_mean, model.bn1.running_mean)
    assert base.name.startswith("model-") and base.cut_points == lite0.cut_points
    with pytest.raises(Exception, match="does not exist"):
        load_backbone(f"model:{tmp_path / 'missing.pt'}")


def test_similarity_combines_the_batchnorm_and_profile_scores(
    lite0, digits_root: Path, tmp_path: Path
) -> None:
    paths = sorted(str(p) for p in digits_root.rglob("*.png"))
    x, manifest = _embed(lite0, digits_root, 64, tmp_path)
    profile = build_profile(
        x, manifest["label"].tolist(), "efficientnet_lite0", None, 64, (), (), (), 0
    )
    cfg = SimilarityConfig(sample_size=32, bootstrap_rounds=30)
    rows = sample_rows(len(paths), cfg, 0)
    by_path = dict(zip(manifest["path"], x, strict=True))
    embeddings = np.stack([by_path[paths[i]] for i in rows])
    engine = ExtractionEngine(lite0, tmp_path / "moments", torch.device("cpu"), num_workers=0)
    plain = score_files(engine, paths, cfg, 0)
    combined = score_files(engine, paths, cfg, 0, profile, embeddings)
    assert combined.bn_score == pytest.approx(plain.score)
    assert combined.profile is not None and combined.profile["score"] > 0.5
    expected = plain.score**0.5 * combined.profile["score"] ** 0.5
    assert combined.score == pytest.approx(expected)
    assert combined.score > plain.score  # the digits' own profile pulls the score up
    assert combined.low <= combined.score <= combined.high
