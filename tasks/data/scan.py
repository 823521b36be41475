"""Scan and count tasks."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from components.common.config import DataConfig, ValidationConfig
from components.common.shards import merge_shards, split_shards
from components.data import counting, scan, scan_cache
from tasks.common.context import RunContext
from tasks.common.policy import transient_only
from tasks.common.sharding import Shards


@task(
    name="scan-shard",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=transient_only,
    cache_policy=NO_CACHE,
)
def inspect_shard(paths: list[Path], max_pixels: int) -> list[dict[str, object]]:
    """Hash and decode one shard of the scan's files, in a Dask worker; rows in ``paths`` order."""
    return scan.inspect_files(paths, max_pixels)


def sharded_inspector(shards: Shards) -> scan.Inspector:
    """Files read by ``inspect_shard`` runs on the cluster, rows merged back in the files' order,
    so the manifest is the one a single process writes."""

    def inspect(paths: list[Path], max_pixels: int) -> list[dict[str, object]]:
        if not paths:
            return []  # nothing new: the cluster is not even started
        parts = split_shards(paths, shards.size)
        rows = shards.run(inspect_shard, [{"paths": p, "max_pixels": max_pixels} for p in parts])
        get_run_logger().info("%d files read in %d shards on Dask", len(paths), len(parts))
        return merge_shards(rows)

    return inspect


@task(
    name="scan",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=transient_only,
    cache_policy=NO_CACHE,
)
def scan_dataset(
    ctx: RunContext,
    cfg: DataConfig,
    validation: ValidationConfig,
    seed: int,
    shards: Shards | None = None,
) -> tuple[Path, scan.ScanSummary]:
    """Write ``manifest.csv`` in the run folder, reading only files new or changed since the last
    scan of this folder (the scan cache is shared by runs); say what was left out. With
    ``shards``, those files are read on the Dask cluster."""
    cache = scan_cache.cache_file(ctx.cache_dir, ctx.data_root)
    inspect = scan.inspect_files if shards is None else sharded_inspector(shards)
    result = scan.scan_folder(ctx.data_root, cfg, validation, seed, cache, inspect)
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
