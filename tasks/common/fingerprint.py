"""Whether this run would repeat the last successful one, and recording a success when it ends.

Plain functions rather than tasks: both are a hash and a small file, cheaper than a task run.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from components.common.config import PipelineConfig
from components.common.fingerprint import (
    RunRecord,
    load_record,
    record_path,
    run_fingerprint,
    save_record,
)
from components.data.digest import data_digest
from components.data.scan import read_manifest
from tasks.common.context import RunContext


def fingerprint_run(cfg: PipelineConfig, usable_manifest: Path) -> tuple[str, str]:
    """(fingerprint, data digest) of a run on the validated manifest with this configuration."""
    digest = data_digest(read_manifest(usable_manifest))
    # Where the work runs (``run``) changes no result, so it is not part of what the run was given.
    config = cfg.model_dump(mode="json", exclude={"run"})
    return run_fingerprint(digest, config, cfg.backbone_weights), digest


def unchanged_since(ctx: RunContext, cfg: PipelineConfig, fingerprint: str) -> RunRecord | None:
    """The last successful run of this dataset when it had this fingerprint, else None."""
    record = load_record(record_path(cfg.output_dir, ctx.name))
    return record if record is not None and record.fingerprint == fingerprint else None


def record_success(
    ctx: RunContext,
    cfg: PipelineConfig,
    fingerprint: str,
    digest: str,
    mlflow_run_id: str,
    registered_model: str,
    model_version: int,
    model_uri: str,
) -> Path:
    """Make this run the one a later run with the same fingerprint is skipped against."""
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
        ),
    )
    return path
