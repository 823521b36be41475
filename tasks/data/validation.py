"""Validation task: Great Expectations over the manifest; stops the run when the dataset fails."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from components.common.config import ValidationConfig
from components.data import validation
from components.data.scan import ScanSummary, read_manifest


@task(name="validate", cache_policy=NO_CACHE)
def validate_dataset(
    manifest_path: Path, cfg: ValidationConfig, run_dir: Path, scan: ScanSummary | None = None
) -> validation.ValidationReport:
    """Quarantine bad files by listing them; raise ``DataValidationError`` if the dataset is unusable."""
    report = validation.validate_manifest(
        read_manifest(manifest_path), cfg, run_dir / "validation", scan
    )
    logger = get_run_logger()
    for item in report.quarantined[:20]:
        logger.warning("quarantined %s: %s", item.path, item.reason)
    logger.info(
        "%d of %d files usable; report %s", report.n_usable, report.n_files, report.json_path
    )
    create_markdown_artifact(key="validation-report", markdown=report.to_markdown())
    report.raise_if_failed()
    return report
