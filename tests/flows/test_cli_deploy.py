"""The deploy commands of the CLI against a real SQLite registry: export-triton and --promote."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from components.common.config import ExportConfig, TrackingConfig
from components.deploy import tracking
from components.deploy.export import export_onnx
from components.deploy.onnx_contract import ModelContract
from flows.cli import _config, build_parser, main
from tests.conftest import tiny_classifier

LABELS = ["cat", "dog"]
PREP = {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 1.0}


def test_promote_option_sets_the_config() -> None:
    parser = build_parser()
    assert _config(parser.parse_args(["run", "--data", "x"])).tracking.promote == "auto"
    args = parser.parse_args(["run", "--data", "x", "--promote", "never"])
    assert _config(args).tracking.promote == "never"
    args = parser.parse_args(["demo", "--promote", "force", "--set", "tracking.promote=never"])
    assert _config(args).tracking.promote == "force"  # the flag wins over --set
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--data", "x", "--promote", "sometimes"])


def test_export_triton_writes_a_repository_triton_can_parse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = TrackingConfig(tracking_uri=uri, experiment="triton")
    contract = ModelContract(tuple(LABELS), PREP, "tiny", "0" * 64, 1, None, "d" * 32)
    onnx_path = export_onnx(
        tiny_classifier(2), torch.randn(3, 3, 32, 32), tmp_path / "m.onnx", ExportConfig(), contract
    ).onnx_path
    run_id = tracking.start_run(cfg, tmp_path, "triton", {})
    for _ in range(2):
        registered = tracking.register_onnx_model(run_id, onnx_path, "pets", LABELS, PREP, uri)
    tracking.finish_run(run_id, tracking_uri=uri)
    tracking.set_alias("pets", "champion", registered.version, tracking_uri=uri)

    repo = tmp_path / "repo"
    argv = ["export-triton", "--model-uri", "models:/pets@champion", "--out", str(repo)]
    assert main([*argv, "--set", f"tracking.tracking_uri={uri}", "--max-batch-size", "8"]) == 0
    assert "tritonserver --model-repository" in capsys.readouterr().out
    assert (repo / "pets" / "2" / "model.onnx").read_bytes() == onnx_path.read_bytes()
    assert (repo / "pets" / "labels.txt").read_text() == "cat\ndog\n"
    config = text_format.Parse(
        (repo / "pets" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert (config.name, config.backend, config.max_batch_size) == ("pets", "onnxruntime", 8)
    assert list(config.input[0].dims) == [3, 32, 32] and list(config.output[0].dims) == [2]
    assert config.output[0].label_filename == "labels.txt"
    assert config.parameters["preprocessing.crop_pct"].string_value == "1.0"

    missing = ["export-triton", "--model-uri", "models:/pets@nobody", "--out", str(repo)]
    assert main([*missing, "--set", f"tracking.tracking_uri={uri}"]) == 2
    assert "models:/pets@nobody" in capsys.readouterr().err


def test_the_summary_says_what_the_gate_did_and_how_to_serve_the_champion(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from flows.cli import _print_promotion

    _print_promotion(
        {
            "verdict": "promoted-better",
            "mode": "auto",
            "reason": "accuracy 0.9500 > champion's 0.9000, significant (p = 0.0313)",
            "challenger_version": 2,
            "challenger_accuracy": 0.95,
            "challenger_interval": [0.9, 0.97],
            "champion_version": 1,
            "champion_accuracy": 0.9,
            "champion_interval": [0.84, 0.94],
            "p_value": 0.03125,
            "n": 120,
            "split": "test",
            "champion_uri": "models:/digits@champion",
            "champion_now": 2,
        },
        "sqlite:////elsewhere/mlflow.db",
    )
    out = capsys.readouterr().out
    assert "promotion: promoted-better (promote=auto)" in out
    assert "challenger v2 0.9500 (95% 0.9000-0.9700) vs champion v1 0.9000" in out
    assert "on 120 test images; McNemar p = 0.0312" in out
    assert (
        "serve it: transfer-pipeline serve-model --model-uri models:/digits@champion "
        "--set tracking.tracking_uri=sqlite:////elsewhere/mlflow.db"
    ) in out
