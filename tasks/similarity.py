"""Similarity task: how far the images sit from the backbone's source domain (and from the
training data of a stored profile, when there is one)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components import similarity
from components.backbones import load_backbone
from components.bn_moments import cached_bn_moments
from components.config import PipelineConfig
from components.dataset import read_manifest
from components.domain_profile import PROFILE_CUT, DomainProfile, load_profile
from components.errors import ConfigError
from components.features import choose_device, extract_features
from components.images import Preprocessing
from components.reporting import plot_similarity_profile


def _profile_embeddings(
    profile: DomainProfile,
    paths: list[str],
    shas: list[str],
    cfg: PipelineConfig,
    cache_dir: Path,
) -> np.ndarray:
    """Embeddings of the sampled images by the profile's own backbone and resolution (cached)."""
    base = load_backbone(profile.backbone, profile.backbone_weights)
    native = base.preprocessing
    prep = Preprocessing(
        profile.image_size, native.mean, native.std, native.crop_pct, native.interpolation
    )
    features = extract_features(
        base,
        paths,
        shas,
        prep,
        cache_dir,
        num_workers=cfg.train.num_workers,
        device=choose_device(cfg.train.device),
    )
    return features[PROFILE_CUT]


@task(name="score-similarity", cache_policy=NO_CACHE)
def score_similarity(
    usable_manifest: Path, cfg: PipelineConfig, run_dir: Path, cache_dir: Path
) -> similarity.SimilarityReport:
    """Score a sample of the training images against the backbone's stored BatchNorm statistics,
    and against a stored domain profile (configured, or the base model's) when there is one."""
    manifest = read_manifest(usable_manifest)
    train = manifest[manifest["split"] == "train"]
    backbone = load_backbone(cfg.backbone, cfg.backbone_weights)
    paths, shas = train["path"].tolist(), train["sha256"].tolist()
    rows = similarity.sample_rows(len(paths), cfg.similarity, cfg.seed)
    sample_paths, sample_shas = [paths[i] for i in rows], [shas[i] for i in rows]
    moments = cached_bn_moments(
        backbone,
        sample_paths,
        sample_shas,
        cache_dir,
        batch_size=cfg.similarity.batch_size,
        num_workers=cfg.train.num_workers,
        device=choose_device(cfg.train.device),
        engine=cfg.train.feature_engine,
    )
    profile_dir = cfg.similarity.profile or backbone.profile_dir
    profile, embeddings = None, None
    if profile_dir is not None:
        if not (Path(profile_dir) / "profile.json").is_file():
            raise ConfigError(f"similarity.profile {profile_dir} holds no profile.json")
        profile = load_profile(Path(profile_dir))
        embeddings = _profile_embeddings(profile, sample_paths, sample_shas, cfg, cache_dir)
    report = similarity.score_similarity(
        backbone,
        paths,
        cfg.similarity,
        cfg.seed,
        cfg.train.num_workers,
        profile,
        embeddings,
        moments,
    )
    plot_similarity_profile(report, run_dir / "similarity_profile.png")
    get_run_logger().info("similarity %.3f [%.3f, %.3f]", report.score, report.low, report.high)
    return report
