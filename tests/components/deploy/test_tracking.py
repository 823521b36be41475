"""Tracking and registry against a fresh SQLite MLflow store in tmp_path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.models import Model

from components.common.config import ExportConfig, TrackingConfig
from components.common.errors import ModelUriError
from components.data.digest import data_digest
from components.deploy import onnx_contract, tracking
from components.deploy.export import export_onnx
from components.deploy.onnx_contract import ModelContract
from tests.conftest import tiny_classifier

LABELS = ["cat", "dog", "fox"]
PREP = {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_classifier(len(LABELS))
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return export_onnx(model, torch.randn(4, 3, 32, 32), out, ExportConfig()).onnx_path


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[TrackingConfig, Path, str]:
    """A fresh store under tmp_path, run from an empty working directory to catch stray files."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    output_dir = tmp_path / "out"
    cfg = TrackingConfig(experiment="unit-tests")
    return cfg, output_dir, tracking.resolve_tracking_uri(cfg, output_dir)


def test_resolve_tracking_uri_prefers_config_then_env_then_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    explicit = TrackingConfig(tracking_uri="http://mlflow.example:5000")
    assert tracking.resolve_tracking_uri(explicit, tmp_path) == "http://mlflow.example:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert tracking.resolve_tracking_uri(TrackingConfig(), tmp_path) == "sqlite:///elsewhere.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = tracking.resolve_tracking_uri(TrackingConfig(), tmp_path / "out")
    assert uri == f"sqlite:///{(tmp_path / 'out' / 'mlruns' / 'mlflow.db').resolve()}"


def test_run_logs_params_metrics_and_artifacts(
    store: tuple[TrackingConfig, Path, str], tmp_path: Path
) -> None:
    cfg, output_dir, uri = store
    run_id = tracking.start_run(cfg, output_dir, "digits-run", {"dataset": "digits"})
    tracking.log_params(run_id, {"lr": 0.01, "case": 2}, tracking_uri=uri)
    tracking.log_metrics(run_id, {"loss": 1.5}, step=0, tracking_uri=uri)
    tracking.log_metrics(run_id, {"loss": 0.5}, step=1, tracking_uri=uri)
    tracking.log_text(run_id, "seed: 0\n", "config.yaml", tracking_uri=uri)
    tracking.log_dict(run_id, {"case": 2}, "decision.json", tracking_uri=uri)
    note = tmp_path / "notes.md"
    note.write_text("# decision\n")
    tracking.log_artifact(run_id, note, "report", tracking_uri=uri)
    fig = Figure()
    fig.subplots().plot([0, 1], [1.5, 0.5])
    tracking.log_figure(run_id, fig, "report/curve.png", tracking_uri=uri)
    tracking.finish_run(run_id, tracking_uri=uri)

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "digits-run"
    assert run.data.params == {"lr": "0.01", "case": "2"}
    assert run.data.tags["dataset"] == "digits"
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.5, 0.5]
    top = {a.path for a in client.list_artifacts(run_id)}
    assert top == {"config.yaml", "decision.json", "report"}
    assert {a.path for a in client.list_artifacts(run_id, "report")} == {
        "report/notes.md",
        "report/curve.png",
    }
    # Artifacts sit beside the SQLite database, and nothing leaked into the working directory.
    assert (output_dir / "mlruns" / "mlflow.db").is_file()
    assert (output_dir / "mlruns" / "artifacts").is_dir()
    assert list(Path.cwd().iterdir()) == []
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_failed_run_is_marked_failed(store: tuple[TrackingConfig, Path, str]) -> None:
    cfg, output_dir, uri = store
    run_id = tracking.start_run(cfg, output_dir, "broken", {})
    tracking.finish_run(run_id, "FAILED", tracking_uri=uri)
    assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FAILED"
    with pytest.raises(ValueError, match="FINISHED"):
        tracking.finish_run(run_id, "DONE", tracking_uri=uri)


def test_register_twice_round_trips_and_sets_no_alias(
    store: tuple[TrackingConfig, Path, str], onnx_file: Path, tmp_path: Path
) -> None:
    cfg, output_dir, uri = store
    run_id = tracking.start_run(cfg, output_dir, "register", {})
    example = np.zeros((1, 3, 32, 32), np.float32)
    first = tracking.register_onnx_model(
        run_id, onnx_file, "pets", LABELS, PREP, uri, extra_metadata={"case": 2}
    )
    second = tracking.register_onnx_model(
        run_id, onnx_file, "pets", LABELS, PREP, uri, input_example=example
    )
    tracking.finish_run(run_id, tracking_uri=uri)

    assert (first.version, second.version) == (1, 2)
    assert second == tracking.RegisteredModel("pets", 2, "models:/pets/2", run_id)
    # Aliases are the promotion step's, once the run has finished.
    assert tracking.alias_version("pets", "champion", tracking_uri=uri) is None
    assert tracking.alias_version("no-such-model", "champion", tracking_uri=uri) is None
    tracking.set_alias("pets", "challenger", 2, tracking_uri=uri)
    assert tracking.alias_version("pets", "challenger", tracking_uri=uri) == 2
    assert tracking.resolve_version("models:/pets@challenger", uri) == ("pets", 2)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("pets", "1")
    assert json.loads(version.tags["labels"]) == LABELS
    assert json.loads(version.tags["preprocessing"]) == PREP
    assert version.tags["case"] == "2"
    assert version.run_id == run_id
    tracking.tag_version("pets", 1, {"promotion.verdict": "promoted-first"}, tracking_uri=uri)
    assert client.get_model_version("pets", "1").tags["promotion.verdict"] == "promoted-first"

    local_dir = tmp_path / "served"
    path, labels, prep = tracking.load_registered("models:/pets@challenger", uri, local_dir)
    assert (labels, prep) == (LABELS, PREP)  # from the sidecar files: this file has no contract
    assert path.is_file() and path.is_relative_to(local_dir)
    model = Model.load(str(path.parent))
    assert model.metadata["labels"] == LABELS
    assert [i["name"] for i in model.signature.inputs.to_dict()] == ["input"]
    assert model.saved_input_example_info is not None  # the example travels with the signature
    assert [p.name for p in path.parent.glob("*.onnx*")] == ["model.onnx"]  # no external data

    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32), dtype=np.float32)
    original = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    served = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        served.run(["logits"], {"input": x})[0], original.run(["logits"], {"input": x})[0]
    )
    older, _, _ = tracking.load_registered("models:/pets/1", uri, tmp_path / "v1")
    assert older.read_bytes() == path.read_bytes()
    assert list(Path.cwd().iterdir()) == []


def test_load_registered_reads_the_contract_inside_the_onnx_file(
    store: tuple[TrackingConfig, Path, str], tmp_path: Path
) -> None:
    cfg, output_dir, uri = store
    contract = ModelContract(
        labels=tuple(LABELS),
        preprocessing=PREP,
        backbone="efficientnet_lite0",
        backbone_weights_sha256="ab" * 32,
        case=2,
        cut="blocks.3",
        data_digest="0123456789abcdef" * 2,
    )
    model = tiny_classifier(len(LABELS))
    path = export_onnx(
        model, torch.randn(4, 3, 32, 32), tmp_path / "m.onnx", ExportConfig(), contract
    ).onnx_path
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["transfer_pipeline.labels"]) == LABELS
    assert json.loads(props["transfer_pipeline.preprocessing"]) == PREP
    assert props["transfer_pipeline.cut"] == "blocks.3"
    assert props["transfer_pipeline.data_digest"] == contract.data_digest
    assert int(props["transfer_pipeline.opset"]) >= ExportConfig().opset

    run_id = tracking.start_run(cfg, output_dir, "contract", {})
    # Sidecars that disagree with the file: the file's own contract must win.
    registered = tracking.register_onnx_model(
        run_id, path, "pets", ["x", "y", "z"], {}, uri, extra_files={"model_uint8.onnx": path}
    )
    tracking.finish_run(run_id, tracking_uri=uri)
    served, labels, prep = tracking.load_registered(registered.model_uri, uri, tmp_path / "s")
    assert (labels, prep) == (LABELS, PREP)
    assert onnx_contract.read_props(served)["backbone"] == "efficientnet_lite0"
    assert (served.parent / "model_uint8.onnx").read_bytes() == path.read_bytes()


def test_registration_refuses_an_invalid_onnx_file(
    store: tuple[TrackingConfig, Path, str], onnx_file: Path, tmp_path: Path
) -> None:
    cfg, output_dir, uri = store
    broken = onnx.load(str(onnx_file))
    broken.graph.node[0].input[0] = "nowhere"
    bad = tmp_path / "bad.onnx"
    onnx.save(broken, str(bad))
    run_id = tracking.start_run(cfg, output_dir, "bad", {})
    with pytest.raises(onnx.checker.ValidationError):
        tracking.register_onnx_model(run_id, bad, "pets", LABELS, PREP, uri)
    assert MlflowClient(tracking_uri=uri).search_registered_models() == []


def test_training_data_is_logged_as_a_dataset_with_the_pipeline_digest(
    store: tuple[TrackingConfig, Path, str],
) -> None:
    cfg, output_dir, uri = store
    manifest = pd.DataFrame(
        {
            "path": ["/d/a/1.png", "/d/b/2.png"],
            "label": ["a", "b"],
            "split": ["train", "test"],
            "sha256": ["1" * 64, "2" * 64],
        }
    )
    run_id = tracking.start_run(cfg, output_dir, "data", {})
    digest = data_digest(manifest)
    tracking.log_dataset(
        run_id,
        manifest,
        source="/d",
        name="pets",
        digest=digest,
        context="training",
        tracking_uri=uri,
    )
    inputs = MlflowClient(tracking_uri=uri).get_run(run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("pets", digest)]
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"
    assert json.loads(inputs[0].dataset.profile)["num_rows"] == 2


def test_fluent_run_puts_the_global_tracking_uri_back(
    store: tuple[TrackingConfig, Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, output_dir, uri = store
    run_id = tracking.start_run(cfg, output_dir, "fluent", {})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///someone-elses.db")
    with tracking.fluent_run(run_id, tracking_uri=uri):
        assert mlflow.active_run().info.run_id == run_id
        assert mlflow.get_tracking_uri() == uri
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///someone-elses.db"
    assert mlflow.active_run() is None
    assert list(Path.cwd().iterdir()) == []


def test_load_registered_names_accepted_uri_forms(store: tuple[TrackingConfig, Path, str]) -> None:
    _, _, uri = store
    with pytest.raises(ModelUriError, match="models:/<name>/<version>"):
        tracking.load_registered("runs:/abc/model", uri)


def test_load_registered_names_what_is_missing(
    store: tuple[TrackingConfig, Path, str], onnx_file: Path
) -> None:
    """A user error (exit 2 in the CLI), and no empty store left behind where none was."""
    cfg, output_dir, uri = store
    with pytest.raises(ModelUriError, match=r"no MLflow store at .*mlflow\.db"):
        tracking.load_registered("models:/pets@challenger", uri)
    assert not output_dir.exists()
    run_id = tracking.start_run(cfg, output_dir, "r", {})
    registered = tracking.register_onnx_model(run_id, onnx_file, "pets", LABELS, PREP, uri)
    tracking.set_alias("pets", "challenger", registered.version, tracking_uri=uri)
    tracking.finish_run(run_id, tracking_uri=uri)
    with pytest.raises(ModelUriError, match="name=cats not found"):
        tracking.load_registered("models:/cats@challenger", uri)
    with pytest.raises(ModelUriError, match="alias champion not found"):
        tracking.load_registered("models:/pets@champion", uri)
    with pytest.raises(ModelUriError, match=r"version=7\) not found"):
        tracking.load_registered("models:/pets/7", uri)
