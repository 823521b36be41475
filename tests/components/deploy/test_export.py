"""export_onnx on real timm and cut-backbone models, checked with ONNX Runtime."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from timm.layers.conv2d_same import Conv2dSame
from torch import nn

from components.common.config import ExportConfig
from components.common.errors import ExportParityError, PipelineError
from components.deploy import onnx_contract
from components.deploy.export import (
    ExportResult,
    check_parity,
    export_onnx,
    export_uint8,
    onnx_session,
)
from components.deploy.onnx_contract import ModelContract
from components.engine.images import Preprocessing, normalise
from components.engine.onnx_graphs import static_same_padding
from tests.conftest import tiny_classifier

CFG = ExportConfig()
SIZE = 64


class CutBackbone(nn.Module):
    """The shape of a case-2 model: a prefix of backbone blocks, a pool and a new head."""

    def __init__(self) -> None:
        super().__init__()
        full = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3)
        self.backbone_prefix = nn.Sequential(full.conv_stem, full.bn1, *full.blocks[:3])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(40, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.backbone_prefix(x)))


class DataDependent(nn.Module):
    """A Python branch on tensor values: neither exporter can represent it faithfully."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = x.mean(dim=(2, 3))
        return self.fc(feats) if feats.sum() > 0 else -self.fc(feats)


class ShapeScaled(nn.Module):
    """Reads the input size as a Python number: the tracer would freeze it, torch.export keeps it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3))) / math.sqrt(x.shape[-1] * x.shape[-2])


class PerImageLoop(nn.Module):
    """A Python loop over the batch: both exporters unroll it, baking the batch size in."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.fc(x[i].mean(dim=(1, 2))) for i in range(x.shape[0])])


def _torch_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model = copy.deepcopy(model).eval()
    with torch.inference_mode():
        return model(x).numpy()


def _onnx_logits(path: Path, x: torch.Tensor) -> np.ndarray:
    return onnx_session(path).run(["logits"], {"input": x.numpy()})[0]


@pytest.fixture(scope="module")
def efficientnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, ExportResult]:
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3)
    model.train()  # the caller's mode must survive the export
    sample = torch.randn(4, 3, SIZE, SIZE)
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    return model, export_onnx(model, sample, out, CFG)


def test_timm_tf_efficientnet_exports_to_one_checked_file(
    efficientnet: tuple[nn.Module, ExportResult],
) -> None:
    model, result = efficientnet
    assert result.onnx_path.is_file()
    assert [p.name for p in result.onnx_path.parent.iterdir()] == ["model.onnx"]
    onnx.checker.check_model(str(result.onnx_path), full_check=True)
    graph = onnx.load(str(result.onnx_path)).graph
    assert [i.name for i in graph.input] == ["input"]
    assert [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert result.opset >= CFG.opset
    assert result.exporter == "torchscript"  # the fast path, with its padding made constant
    assert "Shape" not in {node.op_type for node in graph.node}
    assert result.provider == "CPUExecutionProvider" or result.provider.startswith("CUDA")
    assert result.n_checked == 4
    assert result.argmax_agreement == 1.0
    assert result.max_abs_diff <= CFG.atol
    assert model.training  # not switched to eval behind the caller's back


@pytest.mark.parametrize("batch", [1, 5])
def test_batch_axis_is_dynamic_and_matches_torch(
    efficientnet: tuple[nn.Module, ExportResult], batch: int
) -> None:
    model, result = efficientnet
    x = torch.randn(batch, 3, SIZE, SIZE)
    got = _onnx_logits(result.onnx_path, x)
    assert got.shape == (batch, 3)
    np.testing.assert_allclose(got, _torch_logits(model, x), rtol=1e-4, atol=1e-4)


def test_cut_backbone_model_exports_with_dynamic_batch(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = CutBackbone()
    result = export_onnx(model, torch.randn(3, 3, SIZE, SIZE), tmp_path / "cut.onnx", CFG)
    assert result.argmax_agreement == 1.0
    x = torch.randn(5, 3, SIZE, SIZE)
    np.testing.assert_allclose(
        _onnx_logits(result.onnx_path, x), _torch_logits(model, x), rtol=1e-4, atol=1e-4
    )


def test_parity_check_rejects_a_different_model(
    efficientnet: tuple[nn.Module, ExportResult],
) -> None:
    _, result = efficientnet
    torch.manual_seed(123)
    other = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3)
    with pytest.raises(ExportParityError) as err:
        check_parity(other, result.onnx_path, torch.randn(4, 3, SIZE, SIZE), CFG)
    message = str(err.value)
    assert str(result.onnx_path) in message
    assert "max |logit diff|" in message
    assert "argmax agreement" in message


def test_parity_check_passes_for_the_exported_model(
    efficientnet: tuple[nn.Module, ExportResult],
) -> None:
    model, result = efficientnet
    report = check_parity(model, result.onnx_path, torch.randn(6, 3, SIZE, SIZE), CFG)
    assert report.n_checked == 6
    assert report.argmax_agreement == 1.0
    assert model.training


def test_data_dependent_control_flow_is_refused_not_frozen(tmp_path: Path) -> None:
    out = tmp_path / "branchy.onnx"
    with pytest.raises(PipelineError, match="data-dependent"):
        export_onnx(DataDependent(), torch.randn(2, 3, 8, 8), out, CFG)
    assert not out.exists()


def test_sample_must_be_an_image_batch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="N, C, H, W"):
        export_onnx(DataDependent(), torch.randn(3, 8, 8), tmp_path / "x.onnx", CFG)


def test_static_same_padding_keeps_the_outputs_and_leaves_the_original_alone() -> None:
    torch.manual_seed(2)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    static = static_same_padding(model, x)
    assert any(isinstance(m, Conv2dSame) for m in model.modules())
    assert not any(isinstance(m, Conv2dSame) for m in static.modules())
    with torch.inference_mode():
        torch.testing.assert_close(static(x), model(x), rtol=1e-5, atol=1e-5)


def test_what_the_tracer_would_freeze_is_exported_by_torch_export(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = ShapeScaled()
    result = export_onnx(model, torch.randn(4, 3, 8, 8), tmp_path / "scaled.onnx", CFG)
    assert result.exporter == "dynamo"
    assert result.argmax_agreement == 1.0


def test_a_batch_size_baked_into_the_graph_fails_the_export(tmp_path: Path) -> None:
    out = tmp_path / "loop.onnx"
    with pytest.raises((ExportParityError, PipelineError), match=str(out)):
        export_onnx(PerImageLoop(), torch.randn(4, 3, 8, 8), out, CFG)
    assert not out.exists()


def _contract() -> ModelContract:
    prep = Preprocessing(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1.0)
    return ModelContract(("a", "b", "c"), prep.to_dict(), "tiny", "f" * 64, 2, "blocks.1", "e" * 32)


def test_the_contract_is_inside_the_checked_file_and_restamping_replaces_it(
    tmp_path: Path,
) -> None:
    contract = _contract()
    result = export_onnx(
        tiny_classifier(3), torch.randn(4, 3, 32, 32), tmp_path / "m.onnx", CFG, contract
    )
    props = onnx_contract.read_props(result.onnx_path)
    assert set(props) == {
        "labels",
        "preprocessing",
        "input_format",
        "backbone",
        "backbone_weights_sha256",
        "case",
        "cut",
        "data_digest",
        "pipeline_version",
        "opset",
    }
    assert props["opset"] == str(result.opset) and props["case"] == "2"
    assert props["pipeline_version"] == onnx_contract.pipeline_version() != ""
    assert onnx_contract.labels_and_preprocessing(result.onnx_path) == (
        ["a", "b", "c"],
        json.loads(json.dumps(contract.preprocessing)),
    )
    model = onnx.load(str(result.onnx_path))
    model.metadata_props.add(key="producer.note", value="kept")
    onnx.save(model, str(result.onnx_path))
    onnx_contract.stamp(result.onnx_path, replace(contract, cut=None))
    keys = [p.key for p in onnx.load(str(result.onnx_path)).metadata_props]
    assert "producer.note" in keys and len(keys) == len(set(keys)) == 11
    assert onnx_contract.read_props(result.onnx_path)["cut"] == ""


def test_the_uint8_graph_normalises_inside_and_matches_the_float_graph(tmp_path: Path) -> None:
    contract = _contract()
    prep = Preprocessing.from_dict(contract.preprocessing)
    model = tiny_classifier(3)
    pixels = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    plain = export_onnx(model, torch.randn(4, 3, 32, 32), tmp_path / "f.onnx", CFG, contract)
    embedded = export_uint8(model, pixels, tmp_path / "u8.onnx", prep, CFG, contract)
    assert embedded.argmax_agreement == 1.0 and embedded.n_checked == 5
    session = onnx_session(embedded.onnx_path)
    [inp] = session.get_inputs()
    assert inp.type == "tensor(uint8)" and inp.shape[1:] == [32, 32, 3]
    got = session.run(["logits"], {"input": pixels[:3].numpy()})[0]  # another batch size
    want = _onnx_logits(plain.onnx_path, torch.from_numpy(normalise(pixels[:3].numpy(), prep)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    props = onnx_contract.read_props(embedded.onnx_path)
    assert props["input_format"] == onnx_contract.UINT8_NHWC
    assert json.loads(props["preprocessing"])["layout"] == "NHWC"
    with pytest.raises(ValueError, match="uint8"):
        export_uint8(model, pixels.float(), tmp_path / "x.onnx", prep, CFG)
