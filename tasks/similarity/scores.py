"""Similarity task: how far the images sit from the backbone's source domain (and from the
training data of a stored profile, when there is one)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.common.config import PipelineConfig
from components.common.errors import ConfigError
from components.data.scan import read_manifest
from components.decision.reporting import plot_similarity_profile
from components.engine.backbones import load_backbone
from components.engine.extraction import ExtractionEngine
from components.engine.images import Preprocessing
from components.similarity import scores
from components.similarity.domain_profile import PROFILE_CUT, DomainProfile, load_profile
from tasks.common.progress import stage_progress


def _profile_embeddings(
    profile: DomainProfile,
    paths: list[str],
    shas: list[str],
    engine: ExtractionEngine,
    cfg: PipelineConfig,
) -> np.ndarray:
    """Embeddings of the sampled images by the profile's own backbone and resolution (cached)."""
    weights = None if cfg.backbone_weights is None else str(cfg.backbone_weights)
    if (profile.backbone, profile.backbone_weights) != (cfg.backbone, weights):
        base = load_backbone(profile.backbone, profile.backbone_weights)
        engine = ExtractionEngine(
            base, engine.cache_root, engine.device, engine.engine, engine.num_workers
        )
    native = engine.native
    prep = Preprocessing(
        profile.image_size, native.mean, native.std, native.crop_pct, native.interpolation
    )
    return engine.features(paths, shas, prep)[PROFILE_CUT]


@task(name="score-similarity", cache_policy=NO_CACHE)
def score_similarity(
    usable_manifest: Path, engine: ExtractionEngine, cfg: PipelineConfig, run_dir: Path
) -> scores.SimilarityReport:
    """Score a sample of the training images against the backbone's stored BatchNorm statistics,
    and against a stored domain profile (configured, or the base model's) when there is one."""
    sample = scores.similarity_sample(read_manifest(usable_manifest), cfg.similarity, cfg.seed)
    paths, shas = sample["path"].tolist(), sample["sha256"].tolist()
    with stage_progress("similarity-progress", f"BatchNorm moments of {len(paths)} images") as p:
        moments = engine.moments(paths, shas, on_progress=p)
    profile_dir = cfg.similarity.profile or engine.backbone.profile_dir
    profile, embeddings = None, None
    if profile_dir is not None:
        if not (Path(profile_dir) / "profile.json").is_file():
            raise ConfigError(f"similarity.profile {profile_dir} holds no profile.json")
        profile = load_profile(Path(profile_dir))
        embeddings = _profile_embeddings(profile, paths, shas, engine, cfg)
    report = scores.score_similarity(
        engine.backbone, moments, cfg.similarity, cfg.seed, profile, embeddings
    )
    plot_similarity_profile(report, run_dir / "similarity_profile.png")
    get_run_logger().info("similarity %.3f [%.3f, %.3f]", report.score, report.low, report.high)
    return report
