"""The flows: wiring only. ``transfer_flow`` goes from an image folder to a registered ONNX model;
``plan_flow`` stops after the decision, for a dry run before spending compute."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from components.common.config import PipelineConfig
from components.common.ownership import release_run_folder
from components.common.plan import TransferPlan
from components.data.changes import PreviousRun
from components.data.counting import DatasetCounts
from components.data.validation import ValidationReport
from components.decision.reporting import final_fit_sentence
from components.engine.extraction import ExtractionEngine
from components.engine.images import Preprocessing
from components.similarity.scores import SimilarityReport
from components.training.cases import choose_image_size
from tasks.common.context import RunContext, dataset_name, make_context
from tasks.common.fingerprint import (
    fingerprint_run,
    previous_run,
    record_success,
    unchanged_since,
)
from tasks.common.ownership import claim_flow_run, crash_abandoned_flow_runs
from tasks.common.sharding import Shards, open_shards
from tasks.data.near_duplicates import quarantine_near_duplicates
from tasks.data.scan import count_dataset, scan_dataset
from tasks.data.validation import validate_dataset
from tasks.decision.resolution import choose_resolution
from tasks.decision.strategy import select_case
from tasks.decision.verification import preview_verification, verify_case
from tasks.deploy.export import export_model
from tasks.deploy.tracking import log_and_register
from tasks.engine.embed import embed_dataset, embed_in_shards, open_engine
from tasks.similarity.profile import save_domain_profile
from tasks.similarity.scores import score_similarity
from tasks.training.cases import clean_checkpoints, evaluate_model, train_model


@dataclass
class StageClock:
    """Wall time per stage, for the summary and the benchmarks."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)


@dataclass(frozen=True)
class Decision:
    ctx: RunContext
    engine: ExtractionEngine  # the run's one backbone, its caches and sessions
    validation: ValidationReport
    counts: DatasetCounts
    prep: Preprocessing
    image_size_reason: str
    similarity: SimilarityReport
    plan: TransferPlan
    fingerprint: str = ""  # of data, configuration and backbone; empty when not taken (plans)
    data_digest: str = ""


class Unchanged(Exception):
    """The data, configuration and backbone are those of the last successful run: stop early."""

    def __init__(self, ctx: RunContext, fingerprint: str, since: dict[str, Any]) -> None:
        super().__init__(f"unchanged since run {since['mlflow_run_id']}")
        self.ctx, self.fingerprint, self.since = ctx, fingerprint, since


def _run_name() -> str:
    params = flow_run.parameters
    cfg = params.get("config") or PipelineConfig()
    if isinstance(cfg, dict):
        cfg = PipelineConfig.model_validate(cfg)
    return dataset_name(Path(params["data"]), cfg)


def input_preprocessing(
    counts: DatasetCounts, native: Preprocessing, cfg: PipelineConfig
) -> tuple[Preprocessing, str]:
    """The backbone's own preprocessing at the resolution chosen for this data."""
    size, reason = choose_image_size(
        cfg.train.image_size, counts.median_short_side, native.image_size
    )
    return Preprocessing(
        size, native.mean, native.std, native.crop_pct, native.interpolation
    ), reason


@contextmanager
def owned_run(data: str, cfg: PipelineConfig) -> Iterator[RunContext]:
    """This flow run and its run folder, owned by this process while the block runs.

    What a killed run left is cleared first: its flow run is marked Crashed, its run folder
    removed (MLflow runs are reaped when tracking starts). The folder is released however the
    block ends, short of the process being killed, which is the case the markers are for.
    """
    if flow_run.id is not None:
        claim_flow_run(flow_run.id, list(flow_run.tags))
        crash_abandoned_flow_runs(exclude=flow_run.id)
    ctx = make_context(Path(data), cfg)
    try:
        yield ctx
    finally:
        release_run_folder(ctx.run_dir)


def decide(
    ctx: RunContext,
    cfg: PipelineConfig,
    clock: StageClock,
    fingerprinted: bool = False,
    force: bool = False,
    shards: Shards | None = None,
) -> Decision:
    """Validate, count, score similarity, choose the resolution, embed, set held-out
    near-duplicates aside and choose the case.

    With ``fingerprinted``, the run's fingerprint is taken once the data is validated, and unless
    ``force`` a match with the last successful run raises ``Unchanged`` before anything costly.
    With ``shards`` (``run.task_runner`` on Dask) the scan reads and the embedding computes on
    the cluster.
    """
    with clock.stage("load_backbone"):
        engine = open_engine(cfg, ctx.cache_dir)
    with clock.stage("scan"):
        manifest, scanned = scan_dataset(ctx, cfg.data, cfg.validation, cfg.seed, shards)
    with clock.stage("validate"):
        validation = validate_dataset(manifest, cfg.validation, ctx.run_dir, scanned)
    fingerprint = digest = ""
    if fingerprinted:
        with clock.stage("fingerprint"):
            fingerprint, digest = fingerprint_run(cfg, validation.usable_manifest_path)
            since = None if force else unchanged_since(ctx, cfg, fingerprint)
        if since is not None:
            raise Unchanged(ctx, fingerprint, asdict(since))
    with clock.stage("count"):
        counts = count_dataset(validation.usable_manifest_path)
    rule_prep, rule_reason = input_preprocessing(counts, engine.native, cfg)
    usable = validation.usable_manifest_path
    # Similarity first: it decides whether the case is frozen, which decides how the resolution
    # is chosen; its pass at the native size fills the cache rows the embedding would compute.
    with clock.stage("similarity"):
        similarity = score_similarity(usable, engine, cfg, ctx.run_dir)
    with clock.stage("resolution"):
        resolution = choose_resolution(
            usable, counts, similarity, rule_prep, rule_reason, engine, cfg
        )
    prep = replace(rule_prep, image_size=resolution.chosen)
    with clock.stage("embed"):
        if shards is not None:
            embed_in_shards(shards, usable, prep, engine, cfg)
        embed_dataset(usable, prep, engine, cfg)
    # Near-duplicates after the embedding: it reads the rows just cached at the chosen size, so it
    # runs no forward pass. The stages before it read training images only; where it moves a
    # group of copies out of training, they saw it, but neither scores anything held out: every
    # accuracy after this point is measured on the splits it leaves.
    with clock.stage("near_duplicates"):
        validation = quarantine_near_duplicates(
            validation, prep, engine, cfg.validation, cfg.data, cfg.seed
        )
    if validation.usable_manifest_path != usable:
        usable = validation.usable_manifest_path
        counts = count_dataset(usable)
    with clock.stage("select_case"):
        plan = select_case(
            usable, counts, similarity, prep, engine, cfg, ctx.run_dir, resolution.to_dict()
        )
    return Decision(
        ctx,
        engine,
        validation,
        counts,
        prep,
        resolution.reason,
        similarity,
        plan,
        fingerprint,
        digest,
    )


def verified(d: Decision, cfg: PipelineConfig, previous: PreviousRun | None = None) -> TransferPlan:
    """The decision's plan after budgeted verification of the runner-up on its own data, or
    with ``previous``'s verdict when little changed since it."""
    return verify_case(
        d.validation.usable_manifest_path,
        d.counts,
        d.similarity,
        d.plan,
        d.prep,
        d.engine,
        cfg,
        d.ctx.run_dir,
        previous,
    )


def at_planned_size(d: Decision, plan: TransferPlan) -> Decision:
    """``d`` with ``plan``, at the input size that plan trains at: a fine-tune that won its
    verification against a frozen case keeps the size the budget gave it there."""
    size = int((plan.resolution or {}).get("chosen", d.prep.image_size))
    if size == d.prep.image_size:
        return replace(d, plan=plan)
    reason = str((plan.resolution or {}).get("reason", d.image_size_reason))
    return replace(d, plan=plan, prep=replace(d.prep, image_size=size), image_size_reason=reason)


def _decision_summary(d: Decision) -> dict[str, Any]:
    return {
        "dataset": d.ctx.name,
        "case": d.plan.case,
        "cut": d.plan.cut,
        "reason": d.plan.reason,
        "uncertain": d.plan.uncertain,
        "overridden": d.plan.overridden,
        "similarity": {
            "score": d.similarity.score,
            "low": d.similarity.low,
            "high": d.similarity.high,
            "mean_kl": d.similarity.mean_kl,
            "bn_score": d.similarity.bn_score,
            "profile": d.similarity.profile,
        },
        "counts": {
            "total": d.counts.total,
            "per_split": d.counts.per_split,
            "per_class": d.counts.per_class,
            "imbalance_ratio": d.counts.to_dict()["imbalance_ratio"],
            "imbalanced": d.counts.imbalanced,
        },
        "thresholds": {
            "large_images_per_class": d.plan.large_images_per_class,
            "similar_threshold": d.plan.similar_threshold,
        },
        "probe": None if d.plan.probe is None else asdict(d.plan.probe),
        "verification": d.plan.verification,
        "final_fit": final_fit_sentence(d.counts, d.plan),
        "quarantined": [{"path": q.path, "reason": q.reason} for q in d.validation.quarantined],
        "scan": None if d.validation.scan is None else d.validation.scan.to_dict(),
        "near_duplicates": d.validation.near_duplicates,
        "image_size": d.prep.image_size,
        "image_size_reason": d.image_size_reason,
        "resolution": d.plan.resolution,
        "run_dir": str(d.ctx.run_dir),
        "report": str(d.ctx.run_dir / "decision.md"),
    }


@flow(name="transfer-plan", flow_run_name=_run_name, log_prints=True)
def plan_flow(data: str, config: PipelineConfig | None = None) -> dict[str, Any]:
    """Everything up to the decision; trains nothing."""
    cfg = config or PipelineConfig()
    clock = StageClock()
    start = time.perf_counter()
    with owned_run(data, cfg) as ctx, open_shards(cfg.run) as shards:
        d = decide(ctx, cfg, clock, shards=shards)
        previous = previous_run(ctx, cfg, d.validation.usable_manifest_path)
    preview = preview_verification(d.plan, d.counts, d.prep, d.engine, cfg, previous)
    d = replace(d, plan=replace(d.plan, verification=preview))
    return {
        **_decision_summary(d),
        "data_change": _data_change(previous),
        "stage_seconds": clock.seconds,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _data_change(previous: PreviousRun | None) -> dict[str, Any] | None:
    if previous is None:
        return None
    return {"since_run": previous.record.mlflow_run_id, **previous.change.to_dict()}


def _skipped_summary(unchanged: Unchanged, clock: StageClock, start: float) -> dict[str, Any]:
    since = unchanged.since
    return {
        "dataset": unchanged.ctx.name,
        "skipped": True,
        "reason": f"unchanged since run {since['mlflow_run_id']}: same data, configuration and "
        f"backbone as {since['registered_model']} version {since['model_version']} "
        "(nothing trained or registered; --force runs anyway)",
        "unchanged_since": since,
        "mlflow_run_id": since["mlflow_run_id"],
        "fingerprint": unchanged.fingerprint,
        "run_dir": str(unchanged.ctx.run_dir),
        "stage_seconds": clock.seconds,
        "seconds": round(time.perf_counter() - start, 3),
    }


@flow(name="transfer-pipeline", flow_run_name=_run_name, log_prints=True)
def transfer_flow(
    data: str, config: PipelineConfig | None = None, force: bool = False
) -> dict[str, Any]:
    """Image folder in, registered ONNX model out; returns the run summary.

    A run given what the last successful run was given (same data digest, configuration and
    backbone) stops after validation with ``skipped: true``, unless ``force``; a run after a small
    change reuses that run's verification verdict and fine-tuned weights, unless ``force``.
    """
    cfg = config or PipelineConfig()
    with owned_run(data, cfg) as ctx:
        return _train_and_ship(ctx, cfg, force)


def _train_and_ship(ctx: RunContext, cfg: PipelineConfig, force: bool) -> dict[str, Any]:
    clock = StageClock()
    start = time.perf_counter()
    try:
        with open_shards(cfg.run) as shards:
            d = decide(ctx, cfg, clock, fingerprinted=True, force=force, shards=shards)
    except Unchanged as unchanged:
        print(unchanged)
        return _skipped_summary(unchanged, clock, start)
    manifest, classes, run_dir = (
        d.validation.usable_manifest_path,
        list(d.counts.classes),
        d.ctx.run_dir,
    )
    # What the last successful run measured and trained, when little changed since (not --force).
    previous = None if force else previous_run(d.ctx, cfg, manifest)
    with clock.stage("verify"):
        d = at_planned_size(d, verified(d, cfg, previous))
    with clock.stage("train"):
        trained = train_model(manifest, classes, d.plan, d.prep, d.engine, cfg, run_dir, previous)
    with clock.stage("profile"):
        save_domain_profile(manifest, d.similarity, d.prep, d.engine, cfg, run_dir)
    with clock.stage("evaluate"):
        metrics = evaluate_model(manifest, trained, d.prep, d.engine, cfg, run_dir)
    with clock.stage("export"):
        backbone = d.engine.backbone
        exported = export_model(manifest, trained.model_path, d.prep, backbone, cfg, run_dir)
    with clock.stage("log_and_register"):
        published = log_and_register(
            d.ctx,
            cfg,
            d.validation,
            d.counts,
            d.similarity,
            d.plan,
            trained,
            metrics,
            exported,
            d.prep,
        )
    clean_checkpoints(cfg, trained)  # only now: a run killed before here resumes next time
    registered = published.registered
    record_success(
        d.ctx,
        cfg,
        d.fingerprint,
        d.data_digest,
        manifest,
        d.plan,
        trained,
        (published.run_id, registered.name, registered.version, registered.model_uri),
    )
    return {
        **_decision_summary(d),
        "skipped": False,
        "fingerprint": d.fingerprint,
        "data_change": _data_change(previous),
        "metrics": {"val_accuracy": None, "test_accuracy": None}
        | {f"{k}_accuracy": m.accuracy for k, m in metrics.items()},
        "accuracy": {
            k: {
                "value": m.accuracy,
                "n": m.n,
                "low": m.accuracy_low,
                "high": m.accuracy_high,
                "balanced": m.balanced_accuracy,
                "macro_f1": m.macro_f1,
            }
            for k, m in metrics.items()
        },
        "attempts": list(trained.attempts),
        "warm_start": trained.notes.get("warm_start"),  # fine-tunes: from where, and why
        "device": trained.device,
        "onnx_path": str(exported.onnx_path),
        "onnx_max_abs_diff": exported.max_abs_diff,
        "onnx_uint8_path": None if exported.embedded_path is None else str(exported.embedded_path),
        "mlflow_tracking_uri": published.tracking_uri,
        "mlflow_run_id": published.run_id,
        "registered_model": registered.name,
        "model_version": registered.version,
        "model_uri": registered.model_uri,
        "promotion": published.promotion_summary(),
        "stage_seconds": clock.seconds,
        "seconds": round(time.perf_counter() - start, 3),
    }


FLOWS: dict[str, Callable[..., dict[str, Any]]] = {"run": transfer_flow, "plan": plan_flow}
