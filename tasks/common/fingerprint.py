"""Whether this run would repeat the last successful one, what of it a run after a small change
may reuse, and recording a success when it ends.

Plain functions rather than tasks: both are a hash and a small file, cheaper than a task run.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from components.common.config import PipelineConfig
from components.common.fingerprint import (
    RunRecord,
    config_digest,
    load_record,
    record_path,
    run_fingerprint,
    save_record,
)
from components.common.plan import TransferPlan
from components.data.changes import PreviousRun, manifest_change
from components.data.digest import data_digest
from components.data.scan import read_manifest
from components.training.cases import TrainResult
from tasks.common.context import RunContext


def _config(cfg: PipelineConfig) -> dict:
    # Where the work runs (``run``) changes no result, so it is not part of what the run was given.
    return cfg.model_dump(mode="json", exclude={"run"})


def fingerprint_run(cfg: PipelineConfig, usable_manifest: Path) -> tuple[str, str]:
    """(fingerprint, data digest) of a run on the validated manifest with this configuration."""
    digest = data_digest(read_manifest(usable_manifest))
    return run_fingerprint(digest, _config(cfg), cfg.backbone_weights), digest


def unchanged_since(ctx: RunContext, cfg: PipelineConfig, fingerprint: str) -> RunRecord | None:
    """The last successful run of this dataset when it had this fingerprint, else None."""
    record = load_record(record_path(cfg.output_dir, ctx.name))
    return record if record is not None and record.fingerprint == fingerprint else None


def previous_run(ctx: RunContext, cfg: PipelineConfig, usable_manifest: Path) -> PreviousRun | None:
    """The last successful run of this dataset and how the data changed since, or None when
    there is none or its manifest is gone (nothing of it can be reused then)."""
    record = load_record(record_path(cfg.output_dir, ctx.name))
    if record is None or not Path(record.usable_manifest).is_file():
        return None
    change = manifest_change(
        read_manifest(Path(record.usable_manifest)), read_manifest(usable_manifest)
    )
    same = record.config_digest == config_digest(_config(cfg), cfg.backbone_weights)
    return PreviousRun(record, change, same)


def record_success(
    ctx: RunContext,
    cfg: PipelineConfig,
    fingerprint: str,
    digest: str,
    usable_manifest: Path,
    plan: TransferPlan,
    trained: TrainResult,
    registered: tuple[str, str, int, str],
) -> Path:
    """Make this run the one a later run with the same fingerprint is skipped against, and the
    one a later run after a small change reuses (its verdict, its weights).

    ``registered``: the MLflow run id, registered model name, version and model URI.
    """
    mlflow_run_id, registered_model, model_version, model_uri = registered
    path = record_path(cfg.output_dir, ctx.name)
    save_record(
        path,
        RunRecord(
            fingerprint=fingerprint,
            data_digest=digest,
            mlflow_run_id=mlflow_run_id,
            registered_model=registered_model,
            model_version=int(model_version),
            model_uri=model_uri,
            run_dir=str(ctx.run_dir),
            finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
            config_digest=config_digest(_config(cfg), cfg.backbone_weights),
            usable_manifest=str(usable_manifest),
            model_path=str(trained.model_path),
            case=plan.case,
            image_size=trained.spec.image_size,
            classes=tuple(trained.labels),
            verification=plan.verification,
            changed_since_full=trained.changed_since_full,
        ),
    )
    return path
