"""Embedding task: pooled features at every cut point, cached by image content."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.backbones import load_backbone
from components.config import PipelineConfig
from components.dataset import read_manifest
from components.features import manifest_features
from components.images import Preprocessing
from tasks.policy import transient_only


@task(name="embed", retries=1, retry_condition_fn=transient_only, cache_policy=NO_CACHE)
def embed_dataset(
    usable_manifest: Path, prep: Preprocessing, cfg: PipelineConfig, cache_dir: Path
) -> int:
    """Fill the feature cache for every usable image; later stages read it instead of the network."""
    manifest = read_manifest(usable_manifest)
    backbone = load_backbone(cfg.backbone, cfg.backbone_weights)
    manifest_features(manifest, backbone, prep, cache_dir, cfg.train)
    get_run_logger().info("features ready for %d images at %d px", len(manifest), prep.image_size)
    return len(manifest)
