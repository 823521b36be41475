"""Embedding task: every usable image's pooled features (and the similarity sample's BatchNorm
moments, in the same pass), cached by image content."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.common.config import PipelineConfig
from components.data.scan import read_manifest
from components.engine.backbones import load_backbone
from components.engine.extraction import ExtractionEngine
from components.engine.images import Preprocessing
from tasks.common.policy import transient_only
from tasks.common.progress import stage_progress


def open_engine(cfg: PipelineConfig, cache_dir: Path) -> ExtractionEngine:
    """The run's one extraction engine: the backbone is built here and nowhere else in the run."""
    backbone = load_backbone(cfg.backbone, cfg.backbone_weights)
    return ExtractionEngine.for_training(
        backbone, cache_dir, cfg.train, moments_batch_size=cfg.similarity.batch_size
    )


@task(name="embed", retries=1, retry_condition_fn=transient_only, cache_policy=NO_CACHE)
def embed_dataset(
    usable_manifest: Path, prep: Preprocessing, engine: ExtractionEngine, cfg: PipelineConfig
) -> int:
    """Fill the feature cache for every usable image; later stages read it instead of the network.

    Runs after the similarity stage, whose pass at the backbone's own resolution already cached
    its sample's features with their BatchNorm moments, so those images cost nothing here.
    """
    manifest = read_manifest(usable_manifest)
    paths, shas = manifest["path"].tolist(), manifest["sha256"].tolist()
    with stage_progress("embed-progress", f"embedding {len(paths)} images") as progress:
        engine.features(paths, shas, prep, on_progress=progress)
    get_run_logger().info("features ready for %d images at %d px", len(manifest), prep.image_size)
    return len(manifest)
