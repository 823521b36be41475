"""Exporting a trained classifier to one self-contained ONNX file, and proving it still agrees.

The torch.export-based exporter (``dynamo=True``) is used first: it is PyTorch's maintained path,
it handles timm's TF-style 'same' padding and cut-backbone models, and it refuses to export a graph
whose batch size it cannot keep symbolic instead of silently baking it in. Its translations start
at opset 18 (asking for 17 ends in a failed down-conversion of ``Pad``), so a lower configured
opset is raised to 18. The legacy TorchScript tracer is kept only as a fallback for models
``torch.export`` cannot capture, with tracer warnings turned into errors so that data-dependent
control flow fails loudly instead of being frozen into the graph.
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from components.config import ExportConfig
from components.errors import ExportParityError, PipelineError

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# Lowest opset the dynamo exporter translates to without a lossy version conversion.
DYNAMO_MIN_OPSET = 18
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class ExportResult:
    """Where the ONNX file is and how closely ONNX Runtime reproduced PyTorch on held-out inputs."""

    onnx_path: Path
    opset: int
    max_abs_diff: float
    argmax_agreement: float
    provider: str
    n_checked: int
    exporter: str = "dynamo"


@dataclass(frozen=True)
class ParityReport:
    """ONNX Runtime against PyTorch on one batch."""

    max_abs_diff: float
    argmax_agreement: float
    provider: str
    n_checked: int


def export_onnx(
    model: torch.nn.Module, sample: torch.Tensor, path: Path, cfg: ExportConfig
) -> ExportResult:
    """Write ``model`` as a single ONNX file with a dynamic batch axis, then check parity on ``sample``.

    ``sample`` should be a real held-out batch (N, C, H, W): it fixes the spatial size of the graph
    and is what the parity check runs on. The caller's model is neither moved nor switched to eval.
    Raises ``ExportParityError`` when ONNX Runtime disagrees with PyTorch beyond ``cfg.atol``.
    """
    if sample.ndim != 4:
        raise ValueError(f"sample must be a (N, C, H, W) batch, got shape {tuple(sample.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu_model = _cpu_eval_copy(model)
    sample = sample.detach().to("cpu", torch.float32)
    example = sample[:2]

    opset = max(cfg.opset, DYNAMO_MIN_OPSET)
    if opset != cfg.opset:
        logger.info("opset %d raised to %d, the lowest the dynamo exporter emits", cfg.opset, opset)
    try:
        _export_dynamo(cpu_model, example, path, opset)
        exporter = "dynamo"
    except torch.onnx.OnnxExporterError as err:
        logger.warning(
            "torch.export could not capture %s (%s); falling back to the TorchScript exporter",
            type(model).__name__,
            _ANSI.sub("", str(err.__cause__ or err).strip().splitlines()[0]),
        )
        opset = cfg.opset
        try:
            _export_torchscript(cpu_model, example, path, opset)
        except _TracingUnsafe as trace_err:
            path.unlink(missing_ok=True)
            raise PipelineError(
                f"cannot export {type(model).__name__} to ONNX at {path}: torch.export failed and "
                f"tracing would freeze a data-dependent decision into the graph ({trace_err})"
            ) from err
        exporter = "torchscript"

    onnx.checker.check_model(str(path), full_check=True)
    written = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in written.opset_import if o.domain in ("", "ai.onnx"))
    report = check_parity(cpu_model, path, sample, cfg)
    logger.info(
        "exported %s (%s, opset %d): max |diff| %.2e, argmax agreement %.3f on %d (%s)",
        path,
        exporter,
        opset,
        report.max_abs_diff,
        report.argmax_agreement,
        report.n_checked,
        report.provider,
    )
    return ExportResult(
        onnx_path=path,
        opset=opset,
        max_abs_diff=report.max_abs_diff,
        argmax_agreement=report.argmax_agreement,
        provider=report.provider,
        n_checked=report.n_checked,
        exporter=exporter,
    )


def _cpu_eval_copy(model: torch.nn.Module) -> torch.nn.Module:
    # Already a CPU model in eval mode (our own copy, or the caller's): nothing would change.
    on_cpu = all(t.device.type == "cpu" for t in (*model.parameters(), *model.buffers()))
    if on_cpu and not any(m.training for m in model.modules()):
        return model
    return copy.deepcopy(model).to("cpu").eval()


def _export_dynamo(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
        verbose=False,
    )


def _export_torchscript(
    model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    # A tracer warning means a Python-level decision was frozen into the graph.
    frozen = [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if frozen:
        raise _TracingUnsafe(frozen[0])


class _TracingUnsafe(Exception):
    pass


def check_parity(
    model: torch.nn.Module, onnx_path: Path, sample: torch.Tensor, cfg: ExportConfig
) -> ParityReport:
    """Run ``sample`` through PyTorch (on CPU, eval) and ONNX Runtime and compare the logits.

    Raises ``ExportParityError`` naming both numbers and the file when any prediction differs or
    the largest absolute logit difference exceeds ``cfg.atol``.
    """
    cpu_model = _cpu_eval_copy(model)
    sample = sample.detach().to("cpu", torch.float32)
    with torch.inference_mode():
        expected = cpu_model(sample).numpy()
    session = onnx_session(onnx_path)
    got = session.run([OUTPUT_NAME], {INPUT_NAME: sample.numpy()})[0]
    if got.shape != expected.shape:
        raise ExportParityError(
            f"ONNX model {onnx_path} returned logits of shape {got.shape}, PyTorch {expected.shape}"
        )
    diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
    agreement = float(np.mean(got.argmax(axis=1) == expected.argmax(axis=1)))
    provider = session.get_providers()[0]
    if agreement < 1.0 or diff > cfg.atol:
        raise ExportParityError(
            f"ONNX model {onnx_path} disagrees with PyTorch on {len(sample)} inputs ({provider}): "
            f"max |logit diff| {diff:.3e} (allowed {cfg.atol:.1e}), "
            f"argmax agreement {agreement:.3f} (required 1.0)"
        )
    return ParityReport(diff, agreement, provider, len(sample))


def onnx_session(path: Path) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session on CUDA when a GPU is usable, else on CPU.

    onnxruntime-gpu lists the CUDA provider even on machines without a GPU and then logs an error
    while falling back, so CUDA is only asked for when PyTorch can see a device. TF32 stays off so
    GPU results keep float32 precision (parity and serving match the CPU reference).
    """
    providers: list[str | tuple[str, dict[str, str]]] = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers() and (
        torch.cuda.is_available()
    ):
        providers.insert(0, ("CUDAExecutionProvider", {"use_tf32": "0"}))
    return onnxruntime.InferenceSession(str(path), providers=providers)
