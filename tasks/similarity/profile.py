"""Profile task: a summary of the training data saved next to the model, for later runs to compare."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.common.config import PipelineConfig
from components.data.scan import read_manifest
from components.engine.extraction import ExtractionEngine
from components.engine.images import Preprocessing
from components.similarity.domain_profile import PROFILE_CUT, build_profile, save_profile
from components.similarity.scores import SimilarityReport


@task(name="save-profile", cache_policy=NO_CACHE)
def save_domain_profile(
    usable_manifest: Path,
    similarity: SimilarityReport,
    prep: Preprocessing,
    engine: ExtractionEngine,
    cfg: PipelineConfig,
    run_dir: Path,
) -> Path:
    """Write ``run_dir/profile``: training embeddings (from the cache) and BatchNorm statistics."""
    manifest = read_manifest(usable_manifest)
    train = manifest[manifest["split"] == "train"]
    features = engine.features(train["path"].tolist(), train["sha256"].tolist(), prep)
    profile = build_profile(
        features[PROFILE_CUT],
        train["label"].tolist(),
        cfg.backbone,
        None if cfg.backbone_weights is None else str(cfg.backbone_weights),
        prep.image_size,
        similarity.layer_names,
        similarity.bn_mean,
        similarity.bn_var,
        cfg.seed,
    )
    folder = save_profile(profile, run_dir / "profile")
    get_run_logger().info("domain profile of %d training images saved to %s", len(train), folder)
    return folder
