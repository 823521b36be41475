"""MLflow tracking and registry through explicit clients, addressable by run id from any process.

Nothing here uses MLflow's fluent active run or global tracking URI: ``mlflow.set_tracking_uri``
also writes ``MLFLOW_TRACKING_URI`` into ``os.environ``, and Prefect tasks may run in other threads
or processes. Every call takes the ``tracking_uri`` (from ``resolve_tracking_uri``) and a run id;
``start_run`` leaves the run RUNNING in the store until ``finish_run`` closes it. The one place
that needs MLflow's fluent API (``mlflow.models.evaluate``) borrows it through ``fluent_run``, which
puts the global tracking URI back as it found it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.artifacts
import mlflow.data
import mlflow.onnx
import numpy as np
import onnx
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModelOutput,
    LoggedModelStatus,
    Metric,
    Param,
)
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from mlflow.types import Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID
from mlflow.utils.uri import is_databricks_uri

from components.common.config import TrackingConfig
from components.common.errors import ModelUriError
from components.deploy import onnx_contract, stale_runs

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.json"
PREPROCESSING_FILE = "preprocessing.json"
# Registry tag values are stored in a 5000-character column.
_MAX_TAG_CHARS = 5000
_MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))/?")


@dataclass(frozen=True)
class RegisteredModel:
    """One registered model version (aliases are moved later, by the promotion step)."""

    name: str
    version: int
    model_uri: str
    run_id: str


def resolve_tracking_uri(cfg: TrackingConfig, output_dir: Path) -> str:
    """The configured URI, else ``MLFLOW_TRACKING_URI``, else a SQLite store under ``output_dir``."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if env_uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return env_uri
    db = (Path(output_dir) / "mlruns" / "mlflow.db").resolve()
    return f"sqlite:///{db}"


def _artifact_location(tracking_uri: str) -> str | None:
    # A SQLite store keeps artifacts beside its database; MLflow's own default is ./mlruns under
    # whatever the current directory happens to be. Servers choose their own location.
    db = _sqlite_file(tracking_uri)
    return None if db is None else (db.parent / "artifacts").as_uri()


def _sqlite_file(tracking_uri: str) -> Path | None:
    # sqlite:////abs/path.db or sqlite:///relative.db; urlparse would keep a '//' on the former.
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    return Path(tracking_uri[len(prefix) :].split("?", 1)[0]).resolve()


def _client(tracking_uri: str) -> MlflowClient:
    # The registry lives in the tracking store unless that is Databricks (never used here).
    registry = None if is_databricks_uri(tracking_uri) else tracking_uri
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry)


def _experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    if (exp := client.get_experiment_by_name(name)) is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(tracking_uri))
    except MlflowException:
        # Another process created it first.
        if (exp := client.get_experiment_by_name(name)) is not None:
            return exp.experiment_id
        raise


def start_run(cfg: TrackingConfig, output_dir: Path, run_name: str, tags: dict[str, str]) -> str:
    """Create (if needed) the experiment and a RUNNING run in it; returns the run id.

    The run is tagged with this process's PID and host, and runs that dead processes of this host
    left RUNNING in the experiment are marked KILLED first (``stale_runs``).
    """
    tracking_uri = resolve_tracking_uri(cfg, output_dir)
    if (db := _sqlite_file(tracking_uri)) is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    client = _client(tracking_uri)
    experiment_id = _experiment_id(client, cfg.experiment, tracking_uri)
    stale_runs.reap_stale_runs(client, experiment_id)
    run = client.create_run(
        experiment_id, run_name=run_name, tags={**tags, **stale_runs.owner_tags()}
    )
    logger.info(
        "MLflow run %s (%s) in %s at %s", run.info.run_id, run_name, cfg.experiment, tracking_uri
    )
    return run.info.run_id


def finish_run(run_id: str, status: str = "FINISHED", *, tracking_uri: str) -> None:
    """Close the run as FINISHED, FAILED or KILLED."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"run status must be FINISHED, FAILED or KILLED, got {status!r}")
    _client(tracking_uri).set_terminated(run_id, status=status)


def log_params(run_id: str, params: dict[str, Any], *, tracking_uri: str) -> None:
    """Log parameters (stringified; MLflow refuses changing an already logged value)."""
    batch = [Param(str(k), str(v)) for k, v in params.items()]
    for start in range(0, len(batch), 100):  # MLflow's per-request limit on params
        _client(tracking_uri).log_batch(run_id, params=batch[start : start + 100])


def log_metrics(
    run_id: str, metrics: dict[str, float], step: int | None = None, *, tracking_uri: str
) -> None:
    """Log numeric metrics at ``step`` (0 when not given)."""
    now = int(time.time() * 1000)
    batch = []
    for key, value in metrics.items():
        try:
            batch.append(Metric(str(key), float(value), now, step or 0))
        except (TypeError, ValueError):
            raise TypeError(f"metric {key!r} must be a number, got {value!r}") from None
    for start in range(0, len(batch), 1000):
        _client(tracking_uri).log_batch(run_id, metrics=batch[start : start + 1000])


def log_artifact(
    run_id: str, path: Path, artifact_path: str | None = None, *, tracking_uri: str
) -> None:
    """Upload a file, or a folder's contents, under the run's artifacts."""
    client = _client(tracking_uri)
    if Path(path).is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def log_text(run_id: str, text: str, artifact_file: str, *, tracking_uri: str) -> None:
    """Store ``text`` as the run artifact ``artifact_file`` (e.g. ``config.yaml``)."""
    _client(tracking_uri).log_text(run_id, text, artifact_file)


def log_dict(run_id: str, values: dict[str, Any], artifact_file: str, *, tracking_uri: str) -> None:
    """Store a mapping as a JSON or YAML run artifact (chosen by the file's extension)."""
    _client(tracking_uri).log_dict(run_id, values, artifact_file)


def log_figure(run_id: str, fig: Any, artifact_file: str, *, tracking_uri: str) -> None:
    """Store a matplotlib figure as a run artifact image."""
    _client(tracking_uri).log_figure(run_id, fig, artifact_file)


def log_dataset(
    run_id: str,
    frame: pd.DataFrame,
    *,
    source: str,
    name: str,
    digest: str | None,
    context: str,
    tracking_uri: str,
) -> None:
    """Record ``frame`` (e.g. the manifest) as an MLflow dataset input of the run.

    ``digest`` (at most 36 characters, MLflow's column) replaces MLflow's own hash of the frame, so
    the run's dataset carries the pipeline's data digest.
    """
    dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest)
    entity = Dataset(**dataset.to_dict())
    tags = [InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]
    _client(tracking_uri).log_inputs(run_id, [DatasetInput(dataset=entity, tags=tags)])


def run_status(run_id: str, *, tracking_uri: str) -> str:
    """RUNNING, FINISHED, FAILED, KILLED or SCHEDULED."""
    return _client(tracking_uri).get_run(run_id).info.status


def start_child_run(run_id: str, run_name: str, *, tracking_uri: str) -> str:
    """A run nested under ``run_id`` in its experiment (shown beneath it in the MLflow UI)."""
    client = _client(tracking_uri)
    parent = client.get_run(run_id)
    child = client.create_run(
        parent.info.experiment_id, run_name=run_name, tags={MLFLOW_PARENT_RUN_ID: run_id}
    )
    return child.info.run_id


@contextmanager
def fluent_run(run_id: str, *, tracking_uri: str) -> Iterator[None]:
    """Make ``run_id`` MLflow's active run, against ``tracking_uri``, for APIs that only use the
    fluent run (``mlflow.models.evaluate``); the run is FINISHED when the block ends.

    The global tracking URI and ``MLFLOW_TRACKING_URI`` are put back afterwards, so nothing else in
    the process sees them change for longer than the block.
    """
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
            yield
    finally:
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def _signature(model: onnx.ModelProto) -> ModelSignature:
    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        dims = value.type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        return TensorSpec(dtype, shape, value.name)

    return ModelSignature(
        inputs=Schema([spec(v) for v in model.graph.input]),
        outputs=Schema([spec(v) for v in model.graph.output]),
    )


def _tag_value(values: Any, file_name: str) -> str:
    text = json.dumps(values)
    return text if len(text) <= _MAX_TAG_CHARS else f"too long for a tag; see {file_name}"


def register_onnx_model(
    run_id: str,
    onnx_path: Path,
    name: str,
    labels: list[str],
    preprocessing: dict[str, Any],
    tracking_uri: str,
    extra_metadata: dict[str, Any] | None = None,
    input_example: np.ndarray | None = None,
    extra_files: Mapping[str, Path] | None = None,
) -> RegisteredModel:
    """Log ``onnx_path`` as an MLflow ONNX-flavor model of the run and register a new version.

    The file is checked (``onnx.checker``, full) first: nothing unloadable enters the registry.
    Labels and preprocessing travel four ways so every consumer finds them: in the ONNX file's
    ``metadata_props`` (written at export), in the MLmodel metadata, as
    ``labels.json``/``preprocessing.json`` beside ``model.onnx``, and as tags of the version.
    ``input_example`` (one preprocessed image, NCHW) is stored with the signature;
    ``extra_files`` (name -> file) are copied beside ``model.onnx``. No alias is set here: aliases
    move last, once the run has finished (``promotion.apply_aliases``).
    """
    onnx.checker.check_model(str(onnx_path), full_check=True)
    client = _client(tracking_uri)
    run = client.get_run(run_id)
    proto = onnx.load(str(onnx_path))
    metadata = {"labels": list(labels), "preprocessing": preprocessing, **(extra_metadata or {})}
    example = None
    if input_example is not None:
        example = {proto.graph.input[0].name: np.asarray(input_example, dtype=np.float32)}

    logged = client.create_logged_model(
        run.info.experiment_id, name=name, source_run_id=run_id, model_type="onnx-classifier"
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "model"
            mlflow.onnx.save_model(
                proto,
                str(local),
                mlflow_model=Model(
                    artifact_path=logged.artifact_location,
                    run_id=run_id,
                    model_id=logged.model_id,
                    model_uuid=logged.model_id,
                ),
                signature=_signature(proto),
                input_example=example,
                metadata=metadata,
                # Explicit requirements: inferring them loads the model in a subprocess.
                pip_requirements=mlflow.onnx.get_default_pip_requirements(),
                save_as_external_data=False,
            )
            (local / LABELS_FILE).write_text(json.dumps(list(labels), indent=2))
            (local / PREPROCESSING_FILE).write_text(json.dumps(preprocessing, indent=2))
            for file_name, path in (extra_files or {}).items():
                shutil.copyfile(path, local / file_name)
            client.log_model_artifacts(logged.model_id, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    except Exception:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {
        "labels": _tag_value(list(labels), LABELS_FILE),
        "num_classes": str(len(labels)),
        "preprocessing": _tag_value(preprocessing, PREPROCESSING_FILE),
        **{k: str(v) for k, v in (extra_metadata or {}).items()},
    }
    # The logged model's own location, not "models:/<model_id>": the SQL registry resolves the
    # latter through the *global* tracking URI rather than this client's.
    version = client.create_model_version(
        name,
        source=logged.artifact_location,
        run_id=run_id,
        tags=tags,
        model_id=logged.model_id,
    )
    result = RegisteredModel(
        name, int(version.version), f"models:/{name}/{version.version}", run_id
    )
    logger.info("registered %s (logged model %s)", result.model_uri, logged.model_id)
    return result


def alias_version(name: str, alias: str, *, tracking_uri: str) -> int | None:
    """The version ``alias`` points at, or None (no such alias, or no such registered model)."""
    try:
        return int(_client(tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def set_alias(name: str, alias: str, version: int, *, tracking_uri: str) -> None:
    """Point ``alias`` at ``version`` (moving it from wherever it was)."""
    _client(tracking_uri).set_registered_model_alias(name, alias, str(version))


def tag_version(name: str, version: int, tags: dict[str, Any], *, tracking_uri: str) -> None:
    """Set tags on a registered version (values stringified; long ones shortened)."""
    client = _client(tracking_uri)
    for key, value in tags.items():
        text = value if isinstance(value, str) else json.dumps(value)
        client.set_model_version_tag(name, str(version), key, text[:_MAX_TAG_CHARS])


def resolve_version(model_uri: str, tracking_uri: str) -> tuple[str, int]:
    """``models:/name/3`` or ``models:/name@alias`` as (name, version number)."""
    _parse_model_uri(model_uri)
    _require_store(model_uri, tracking_uri)
    name, version = _resolve_version(_client(tracking_uri), model_uri)
    return name, int(version)


def _parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """(name, version, alias) of ``models:/name/3`` or ``models:/name@alias``."""
    match = _MODEL_URI.fullmatch(model_uri)
    if match is None:
        raise ModelUriError(
            f"model URI {model_uri!r} must look like models:/<name>/<version> "
            "or models:/<name>@<alias>"
        )
    name, version, alias = match.group("name", "version", "alias")
    return name, version, alias


def _resolve_version(client: MlflowClient, model_uri: str) -> tuple[str, str]:
    """(name, version) that ``model_uri`` names now; a missing model or alias is a user error."""
    name, version, alias = _parse_model_uri(model_uri)
    if alias is None:
        return name, str(version)
    try:
        return name, str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise ModelUriError(f"cannot load {model_uri}: {err.message}") from None


def _require_store(model_uri: str, tracking_uri: str) -> None:
    """Refuse to look a model up in a SQLite store that does not exist: asking would create an
    empty one there, and nothing can be registered in it yet."""
    db = _sqlite_file(tracking_uri)
    if db is not None and not db.is_file():
        raise ModelUriError(
            f"cannot load {model_uri}: there is no MLflow store at {db} (set output_dir to the "
            "one the model was trained with, or tracking.tracking_uri / MLFLOW_TRACKING_URI)"
        )


def resolve_model_version(model_uri: str, tracking_uri: str) -> tuple[str, str]:
    """The registered model's name and the version ``model_uri`` names now (an alias resolved).

    Cheap (one registry query), so a server can poll it to notice an alias that moved.
    """
    _parse_model_uri(model_uri)
    _require_store(model_uri, tracking_uri)
    return _resolve_version(_client(tracking_uri), model_uri)


def load_registered(
    model_uri: str, tracking_uri: str, dst_dir: Path | None = None
) -> tuple[Path, list[str], dict[str, Any]]:
    """Download a registered version (``models:/name/3`` or ``models:/name@alias``) for serving.

    Returns the local ONNX file, the class labels in output order and the preprocessing mapping,
    read from the file's own ``metadata_props`` when it carries them (the file is then all a
    consumer needs), else from the sidecar ``labels.json``/``preprocessing.json`` (versions
    registered before the contract). The version is resolved through this URI's client: MLflow's
    ``models:/`` download path consults the global registry URI instead.
    """
    _parse_model_uri(model_uri)
    _require_store(model_uri, tracking_uri)
    client = _client(tracking_uri)
    name, version = _resolve_version(client, model_uri)
    try:
        source = client.get_model_version_download_uri(name, version)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise ModelUriError(f"cannot load {model_uri} from {tracking_uri}: {err.message}") from None
    dst = Path(dst_dir) if dst_dir is not None else Path(tempfile.mkdtemp(prefix="model-"))
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(dst), tracking_uri=tracking_uri
        )
    )
    onnx_path = local / Model.load(str(local)).flavors["onnx"]["data"]
    embedded = onnx_contract.labels_and_preprocessing(onnx_path)
    if embedded is not None:
        labels, preprocessing = embedded
    else:
        labels = json.loads((local / LABELS_FILE).read_text())
        preprocessing = json.loads((local / PREPROCESSING_FILE).read_text())
    logger.info("downloaded %s/%s to %s", name, version, local)
    return onnx_path, labels, preprocessing
