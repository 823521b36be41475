"""A run's fingerprint, and the record of the last successful run, so a retrain can skip itself.

A scheduled retrain that finds the same data, the same configuration and the same backbone as the
last run that registered a model would spend minutes to register the same model again. The
fingerprint is one hash over those three: the data digest (which files' contents, labels and
splits), the whole configuration as validated, and the backbone's name with the contents of its
weights file when one is configured. The record of the last successful run per dataset is a small
JSON file under ``output_dir``, replaced atomically; one that cannot be read counts as no record,
so the run goes ahead rather than stopping.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_fingerprint(data_digest: str, config: dict[str, Any], weights: Path | None) -> str:
    """sha256 (hex) over the data digest, the configuration (JSON, keys sorted) and the weights.

    ``config`` is ``PipelineConfig.model_dump(mode="json")``, so the backbone's name is in it; a
    weights file is named there by path only, so its contents are hashed in as well.
    """
    weights_sha = _file_sha256(weights) if weights is not None and Path(weights).is_file() else ""
    payload = json.dumps(
        {"data_digest": data_digest, "config": config, "backbone_weights_sha256": weights_sha},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class RunRecord:
    """What a successful run registered, under the fingerprint of what it was given."""

    fingerprint: str
    data_digest: str
    mlflow_run_id: str
    registered_model: str
    model_version: int
    model_uri: str
    run_dir: str
    finished_at: str
    # What the next run may reuse when only a little of the data changed (``PreviousRun``); records
    # written before these fields existed load with the defaults and offer nothing to reuse.
    config_digest: str = ""  # the fingerprint without the data: same configuration and backbone
    usable_manifest: str = ""  # the files the model was trained and evaluated on
    model_path: str = ""
    case: int = 0
    image_size: int = 0
    classes: tuple[str, ...] = ()
    verification: dict[str, Any] | None = None  # the plan's verification, as run or reused
    # Share of files changed since the last training from the pre-trained weights (0 after one):
    # warm starts stop once it grows past ``train.warm_start_max_change``.
    changed_since_full: float = 0.0


def config_digest(config: dict[str, Any], weights: Path | None) -> str:
    """The fingerprint of a run on no data: equal for two runs given the same configuration and
    backbone weights, whatever their data."""
    return run_fingerprint("", config, weights)


def record_path(output_dir: Path, dataset: str) -> Path:
    """Where the last successful run of ``dataset`` is recorded."""
    return Path(output_dir) / "fingerprints" / f"{dataset}.json"


def load_record(path: Path) -> RunRecord | None:
    """The recorded run, or None when there is none or the file cannot be trusted."""
    try:
        fields = json.loads(Path(path).read_text())
        return RunRecord(**{**fields, "classes": tuple(fields.get("classes", ()))})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as err:
        log.warning("run record %s cannot be read (%s): ignored", path, err)
        return None


def save_record(path: Path, record: RunRecord) -> None:
    """Replace the record at ``path`` atomically (temporary file, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(record), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
