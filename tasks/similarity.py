"""Similarity task: how far the images sit from the backbone's source domain."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components import similarity
from components.backbones import load_backbone
from components.config import PipelineConfig
from components.dataset import read_manifest
from components.reporting import plot_similarity_profile


@task(name="score-similarity", cache_policy=NO_CACHE)
def score_similarity(
    usable_manifest: Path, cfg: PipelineConfig, run_dir: Path
) -> similarity.SimilarityReport:
    """Score a sample of the training images against the backbone's stored BatchNorm statistics."""
    manifest = read_manifest(usable_manifest)
    train = manifest[manifest["split"] == "train"]
    backbone = load_backbone(cfg.backbone, cfg.backbone_weights)
    report = similarity.score_similarity(
        backbone, train["path"].tolist(), cfg.similarity, cfg.seed, cfg.train.num_workers
    )
    plot_similarity_profile(report, run_dir / "similarity_profile.png")
    get_run_logger().info("similarity %.3f [%.3f, %.3f]", report.score, report.low, report.high)
    return report
