"""End to end: a real Prefect run, a real MLflow store in a temp dir, a real ONNX Runtime session."""

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
import pytest
from mlflow import MlflowClient

from components.config import build_config
from components.images import Preprocessing, preprocess_file
from components.tracking import load_registered
from flows.cli import main
from flows.transfer import transfer_flow

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, **sections):
    return build_config(
        {
            "output_dir": str(tmp_path / "out"),
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            "similarity": {"sample_size": 32, "bootstrap_rounds": 50},
            "train": {"num_workers": 0},
            **sections,
        }
    )


def test_flow_goes_from_folder_to_registered_onnx_model(digits_root: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    summary = transfer_flow(data=str(digits_root), config=cfg)

    assert summary["case"] == 2 and summary["cut"].startswith("block")  # small and different
    assert summary["similarity"]["score"] < cfg.strategy.similar_threshold
    assert summary["counts"]["total"] == 400
    assert summary["metrics"]["val_accuracy"] > 0.8 and summary["metrics"]["test_accuracy"] > 0.8

    # The ONNX file agrees with the labels it was registered with, on real held-out images.
    uri = cfg.tracking.tracking_uri
    onnx_path, labels, prep = load_registered(summary["model_uri"], uri, tmp_path / "served")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    images = sorted(digits_root.glob("7/*.png"))[:8]
    batch = np.stack([preprocess_file(p, Preprocessing.from_dict(prep)) for p in images])
    predicted = [labels[i] for i in session.run(None, {"input": batch})[0].argmax(1)]
    assert predicted.count("7") >= 6

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["case"] == "2" and "val_accuracy" in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) > 1  # per epoch
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {
        "report/decision.md",
        "report/similarity_profile.png",
        "report/confusion_val.png",
    } <= artifacts
    version = client.get_model_version_by_alias(summary["registered_model"], "candidate")
    assert int(version.version) == summary["model_version"] == 1

    # A rerun on the same data embeds nothing again and registers version 2.
    again = transfer_flow(data=str(digits_root), config=cfg)
    assert (
        again["model_version"] == 2
        and again["stage_seconds"]["embed"] < summary["stage_seconds"]["embed"]
    )
    mlflow.set_tracking_uri(None)


def test_cli_json_summary_and_plan(digits_root: Path, tmp_path: Path, capsys) -> None:
    """A usable dataset with a few bad files: they are listed, and the good ones still train."""
    data = tmp_path / "digits-with-bad-files"
    shutil.copytree(digits_root, data)
    good = (data / "3" / "0001.png").read_bytes()
    (data / "3" / "truncated.png").write_bytes(good[: len(good) // 2])
    (data / "5" / "notes.png").write_text("not an image")
    cfg_file = tmp_path / "pipeline.yaml"
    cfg_file.write_text(json.dumps(_config(tmp_path).model_dump(mode="json")))
    assert main(["plan", "--data", str(data), "--config", str(cfg_file), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"case", "cut", "reason", "similarity", "counts", "thresholds"} <= set(plan)
    assert plan["thresholds"]["similar_threshold"] == 0.5 and "metrics" not in plan
    quarantined = {Path(q["path"]).name: q["reason"] for q in plan["quarantined"]}
    assert set(quarantined) == {"truncated.png", "notes.png"}
    assert plan["counts"]["total"] == 400

    code = main(
        ["run", "--data", str(digits_root), "--config", str(cfg_file), "--case", "1", "--json"]
    )
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["case"] == 1 and summary["overridden"]
    for key in (
        "case",
        "reason",
        "similarity",
        "counts",
        "metrics",
        "onnx_path",
        "mlflow_run_id",
        "model_version",
        "seconds",
    ):
        assert key in summary
    assert Path(summary["onnx_path"]).is_file()


def test_cli_stops_with_a_clear_message_on_bad_data(tmp_path: Path, capsys) -> None:
    cfg_file = tmp_path / "pipeline.yaml"
    cfg_file.write_text(json.dumps(_config(tmp_path).model_dump(mode="json")))
    code = main(["run", "--data", str(tmp_path / "nowhere"), "--config", str(cfg_file)])
    assert code == 2
    assert "nowhere does not exist" in capsys.readouterr().err
