"""What every task of one run shares: where the data is and where the run writes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from components.common.config import PipelineConfig
from components.common.errors import ConfigError
from components.common.ownership import claim_run_folder, remove_abandoned_run_folders
from components.data import naming


@dataclass(frozen=True)
class RunContext:
    """The run's identity and folders (small and serialisable, so tasks can take it as input)."""

    name: str  # dataset name, kebab-case: run names, experiment and registered model names use it
    data_root: Path
    run_dir: Path
    cache_dir: Path


def dataset_name(data_root: Path, cfg: PipelineConfig) -> str:
    """``data.name``, else the first non-generic folder up from the data (``mnist/train``: mnist)."""
    return naming.dataset_name(data_root, cfg.data.name)


def registered_model_name(ctx: RunContext, cfg: PipelineConfig) -> str:
    """``tracking.model_name`` as configured (validated there), else the dataset's name."""
    return cfg.tracking.model_name or ctx.name


def make_context(data_root: Path, cfg: PipelineConfig) -> RunContext:
    """A fresh run folder under ``output_dir``, marked as this process's run in progress; the
    feature cache is shared across runs. Folders of runs whose process was killed go first."""
    name = dataset_name(data_root, cfg)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    runs_root = cfg.output_dir / "runs"
    run_dir = (runs_root / f"{name}-{stamp}").resolve()
    if runs_root.is_dir():
        remove_abandoned_run_folders(runs_root)
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
        claim_run_folder(run_dir)
    except (FileExistsError, NotADirectoryError, PermissionError) as err:
        raise ConfigError(
            f"output_dir {cfg.output_dir}: cannot create the run folder {run_dir} "
            f"({err.strerror or err})"
        ) from None
    cache_dir = cfg.run.cache_dir or cfg.output_dir / "cache"
    return RunContext(name, Path(data_root).resolve(), run_dir, Path(cache_dir).resolve())
