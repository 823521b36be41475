"""The Triton repository, its config parsed with Triton's own protobuf definitions."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2

from components.common.config import ExportConfig
from components.deploy import triton
from components.deploy.export import export_onnx
from tests.conftest import tiny_classifier

LABELS = ["cat", "dog", 'fox "the quick"']
PREP = {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_repository_layout_and_config_parse(tmp_path: Path) -> None:
    onnx_path = export_onnx(
        tiny_classifier(3), torch.randn(4, 3, 32, 32), tmp_path / "m.onnx", ExportConfig()
    ).onnx_path
    model_dir = triton.write_repository(
        onnx_path, LABELS, "pets", 7, tmp_path / "repo", max_batch_size=16, preprocessing=PREP
    )
    assert model_dir == tmp_path / "repo" / "pets"
    assert (model_dir / "7" / "model.onnx").read_bytes() == onnx_path.read_bytes()
    assert (model_dir / "labels.txt").read_text().splitlines() == LABELS

    config = parse(model_dir / "config.pbtxt")
    assert (config.name, config.platform, config.backend) == (
        "pets",
        "onnxruntime_onnx",
        "onnxruntime",
    )
    assert config.max_batch_size == 16 and config.HasField("dynamic_batching")
    [inp] = config.input
    assert (inp.name, inp.data_type, list(inp.dims)) == (
        "input",
        model_config_pb2.TYPE_FP32,
        [3, 32, 32],
    )
    [out] = config.output
    assert (out.name, list(out.dims), out.label_filename) == ("logits", [3], "labels.txt")
    assert config.parameters["preprocessing.mean"].string_value == "[0.5, 0.5, 0.5]"

    # A second version lands beside the first; the config follows the latest graph.
    triton.write_repository(onnx_path, LABELS, "pets", 8, tmp_path / "repo")
    assert sorted(p.name for p in model_dir.iterdir() if p.is_dir()) == ["7", "8"]
    assert parse(model_dir / "config.pbtxt").max_batch_size == 32


def test_a_fixed_batch_graph_is_served_without_batching(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["logits"])],
        "fixed",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph), str(path))
    config = text_format.Parse(
        triton.triton_config(path, "fixed", 8), model_config_pb2.ModelConfig()
    )
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [1, 4]
    with pytest.raises(ValueError, match="max_batch_size"):
        triton.write_repository(path, ["a"], "fixed", 1, tmp_path / "repo", max_batch_size=0)
