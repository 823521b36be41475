"""Resolution task: measure the candidate input sizes before the full embedding is trusted."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.common.config import PipelineConfig
from components.common.plan import TransferPlan
from components.common.progress import ProgressCallback
from components.data.counting import DatasetCounts
from components.data.scan import read_manifest
from components.decision import resolution, strategy
from components.decision.costs import finetune_seconds, training_throughput
from components.engine.extraction import ExtractionEngine
from components.engine.images import Preprocessing
from components.similarity.scores import SimilarityReport
from tasks.common.progress import stage_progress


def stratified_sample(train: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    """At most ``limit`` training rows, the same share of every class (at least 10 each)."""
    classes = train["label"].nunique()
    per_class = max(10, limit // max(classes, 1))
    parts = [g.sample(min(len(g), per_class), random_state=seed) for _, g in train.groupby("label")]
    return pd.concat(parts).sort_values("path")


def _probe_sizes(
    train: pd.DataFrame,
    sizes: tuple[int, ...],
    prep: Preprocessing,
    similarity: SimilarityReport,
    engine: ExtractionEngine,
    cfg: PipelineConfig,
    on_progress: ProgressCallback,
) -> resolution.ResolutionChoice:
    sample = stratified_sample(train, cfg.strategy.resolution_sample_images, cfg.seed)
    labels = np.unique(sample["label"].to_numpy(), return_inverse=True)[1]
    return resolution.measure_sizes(
        sample["path"].tolist(),
        sample["sha256"].tolist(),
        labels,
        sizes,
        prep,
        engine,
        cfg.seed,
        strategy.probe_preference(similarity, cfg.strategy),
        on_progress,
    )


@task(name="choose-resolution", cache_policy=NO_CACHE)
def choose_resolution(
    usable_manifest: Path,
    counts: DatasetCounts,
    similarity: SimilarityReport,
    prep: Preprocessing,
    rule_reason: str,
    engine: ExtractionEngine,
    cfg: PipelineConfig,
) -> resolution.ResolutionChoice:
    """The input size to train at: measured for frozen cases, budgeted for fine-tuned ones."""
    if cfg.train.image_size != "auto":
        return resolution.fixed_choice(prep.image_size, rule_reason, "config")
    sizes = resolution.candidate_sizes(prep.image_size, engine.native.image_size)
    if len(sizes) == 1 or cfg.strategy.resolution == "rule":
        return resolution.fixed_choice(prep.image_size, rule_reason, "rule")
    manifest = read_manifest(usable_manifest)
    train = manifest[manifest["split"] == "train"]
    if strategy.planned_case(counts, similarity, cfg.strategy) in (1, 2):
        with stage_progress("resolution-progress", f"probing sizes {sizes}") as progress:
            choice = _probe_sizes(train, sizes, prep, similarity, engine, cfg, progress)
    else:
        choice = budgeted_finetune_size(sizes, counts, engine, cfg)
    get_run_logger().info(choice.reason)
    return choice


def budgeted_finetune_size(
    sizes: tuple[int, ...], counts: DatasetCounts, engine: ExtractionEngine, cfg: PipelineConfig
) -> resolution.ResolutionChoice:
    """The largest of ``sizes`` whose fine-tune, at the measured training rate, fits the budget."""
    n_train, n_val = counts.per_split.get("train", 0), counts.per_split.get("val", 0)
    estimated = {
        size: finetune_seconds(
            n_train,
            n_val,
            cfg.train.finetune_epochs,
            training_throughput(
                engine.backbone, size, engine.device, engine.cache_root / "throughput.json"
            ),
        )
        for size in sizes
    }
    return resolution.choose_by_budget(estimated, cfg.strategy.finetune_budget_s)


def finetune_input(
    plan: TransferPlan,
    counts: DatasetCounts,
    prep: Preprocessing,
    engine: ExtractionEngine,
    cfg: PipelineConfig,
) -> tuple[Preprocessing, resolution.ResolutionChoice] | None:
    """The input a fine-tune (case 3 or 4) trains at when the size was probed for a frozen case.

    A probe measures frozen features, and a fine-tune pays for its size every epoch: so the
    fine-tuned runner-up, and the final model when it wins, take the size the budget gives, as
    they would had the rule chosen a fine-tune. None when the size was not probed (set in
    configuration, the only candidate, or already chosen by the budget).
    """
    measured = plan.resolution or {}
    if measured.get("method") != "probe":
        return None
    sizes = tuple(int(c["size"]) for c in measured["candidates"])
    choice = budgeted_finetune_size(sizes, counts, engine, cfg)
    return replace(prep, image_size=choice.chosen), choice
