"""Embedding task: every usable image's pooled features (and the similarity sample's BatchNorm
moments, in the same pass), cached by image content; on Dask, computed in shards by the workers."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.common.config import PipelineConfig
from components.common.shards import shard_size, split_shards
from components.data.scan import read_manifest
from components.engine.backbones import load_backbone
from components.engine.extraction import ExtractionEngine
from components.engine.images import Preprocessing
from tasks.common.policy import transient_only
from tasks.common.progress import stage_progress
from tasks.common.sharding import Shards, worker_threads


def open_engine(cfg: PipelineConfig, cache_dir: Path, cpus: int | None = None) -> ExtractionEngine:
    """The run's one extraction engine: the backbone is built here and nowhere else in the run
    (a Dask worker builds its own, once, for the shards it runs)."""
    backbone = load_backbone(cfg.backbone, cfg.backbone_weights)
    return ExtractionEngine.for_training(
        backbone, cache_dir, cfg.train, moments_batch_size=cfg.similarity.batch_size, cpus=cpus
    )


@functools.lru_cache(maxsize=1)
def _worker_engine(cfg: PipelineConfig, cache_dir: Path, cpus: int | None) -> ExtractionEngine:
    # Kept by the worker process across the shards it runs: otherwise every shard would build
    # the backbone (1.5 s) and open its ONNX Runtime session again.
    return open_engine(cfg, cache_dir, cpus)


@task(name="embed-shard", retries=1, retry_condition_fn=transient_only, cache_policy=NO_CACHE)
def embed_shard(
    paths: list[str], shas: list[str], prep: Preprocessing, cfg: PipelineConfig, cache_dir: Path
) -> int:
    """Compute and cache one shard's features in a Dask worker, with as many ONNX Runtime
    threads as the worker has; returns the worker's PID (which process did the work)."""
    engine = _worker_engine(cfg, cache_dir, worker_threads())
    engine.features(paths, shas, prep)
    return os.getpid()


def embed_in_shards(
    shards: Shards,
    usable_manifest: Path,
    prep: Preprocessing,
    engine: ExtractionEngine,
    cfg: PipelineConfig,
) -> None:
    """Spread the images the feature cache lacks over the cluster, in shards of whole batches;
    the workers write the shared cache folder, which the flow's engine then reads.

    Called by the flow itself, not inside a task: Prefect sends the submitting task's parameters
    with every shard, and the engine (sessions, the backbone) stays in this process.
    """
    manifest = read_manifest(usable_manifest)
    paths, shas = manifest["path"].tolist(), manifest["sha256"].tolist()
    todo = engine.missing_features(shas, prep)
    if not todo:
        return  # a rerun: nothing to compute, no cluster started
    path_of = dict(zip(shas, paths, strict=True))
    engine.prepare(prep)  # one export of the graph, not one per worker
    fixed = {"prep": prep, "cfg": cfg, "cache_dir": engine.cache_root}
    parts = split_shards(todo, shard_size(shards.size, engine.feature_batch(prep)))
    pids = shards.run(
        embed_shard, [{"paths": [path_of[s] for s in p], "shas": p, **fixed} for p in parts]
    )
    added = engine.refresh(prep)
    get_run_logger().info(
        "%d images embedded in %d shards by %d Dask worker processes (%d rows read back)",
        len(todo),
        len(parts),
        len(set(pids)),
        added,
    )


@task(name="embed", retries=1, retry_condition_fn=transient_only, cache_policy=NO_CACHE)
def embed_dataset(
    usable_manifest: Path, prep: Preprocessing, engine: ExtractionEngine, cfg: PipelineConfig
) -> int:
    """Fill the feature cache for every usable image; later stages read it instead of the network.

    Runs after the similarity stage, whose pass at the backbone's own resolution already cached
    its sample's features with their BatchNorm moments, so those images cost nothing here; after
    ``embed_in_shards`` on Dask, it only reads what the workers cached.
    """
    manifest = read_manifest(usable_manifest)
    paths, shas = manifest["path"].tolist(), manifest["sha256"].tolist()
    with stage_progress("embed-progress", f"embedding {len(paths)} images") as progress:
        engine.features(paths, shas, prep, on_progress=progress)
    get_run_logger().info("features ready for %d images at %d px", len(manifest), prep.image_size)
    return len(manifest)
