"""Scan and count tasks."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from components.common.config import DataConfig, ValidationConfig
from components.data import counting, scan, scan_cache
from tasks.common.context import RunContext
from tasks.common.policy import transient_only


@task(
    name="scan",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=transient_only,
    cache_policy=NO_CACHE,
)
def scan_dataset(
    ctx: RunContext, cfg: DataConfig, validation: ValidationConfig, seed: int
) -> tuple[Path, scan.ScanSummary]:
    """Write ``manifest.csv`` in the run folder, reading only files new or changed since the last
    scan of this folder (the scan cache is shared by runs); say what was left out."""
    cache = scan_cache.cache_file(ctx.cache_dir, ctx.data_root)
    result = scan.scan_folder(ctx.data_root, cfg, validation, seed, cache_path=cache)
    path = ctx.run_dir / "manifest.csv"
    result.manifest.to_csv(path, index=False)
    get_run_logger().info(
        "manifest of %d files written to %s (%d unchanged since the last scan)",
        len(result.manifest),
        path,
        result.from_cache,
    )
    return path, result.summary


@task(name="count", cache_policy=NO_CACHE)
def count_dataset(usable_manifest: Path) -> counting.DatasetCounts:
    """Totals and per-class counts of the validated dataset."""
    counts = counting.count_dataset(scan.read_manifest(usable_manifest))
    get_run_logger().info(
        "%d images, %d classes, smallest class %d in train",
        counts.total,
        len(counts.classes),
        counts.min_train_per_class,
    )
    if counts.imbalanced:
        get_run_logger().warning(
            "imbalanced: the largest class has %.1fx the images of the smallest (over %g x); "
            "balanced accuracy and macro-F1 are reported beside accuracy",
            counts.imbalance_ratio,
            counting.IMBALANCE_RATIO,
        )
    create_markdown_artifact(key="dataset-counts", markdown=counts.to_markdown())
    return counts
