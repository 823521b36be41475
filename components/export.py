"""Exporting a trained classifier to one self-contained ONNX file, and proving it still agrees.

Two exporters, fastest first. The TorchScript tracer runs on a copy whose timm TF-style 'same'
padding has been fixed for the input size (``static_same_padding``): on Lite0 it writes the graph
in 0.4 s where the torch.export-based exporter (``dynamo=True``) takes 6.5-7 s, and ONNX Runtime
runs both graphs at the same speed. Tracer warnings are errors, so a data-dependent decision is
never frozen into the graph; any failure of the tracer, or a traced graph that disagrees with
PyTorch, hands over to ``torch.export``, PyTorch's maintained path, which keeps the batch axis
symbolic or refuses. Both write opset 18 or later (the dynamo translations start at 18; asking for
17 ends in a failed down-conversion of ``Pad``).
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
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.padding import pad_same_arg
from torch import nn

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
    cpu_model = cpu_eval_copy(model)
    sample = sample.detach().to("cpu", torch.float32)
    example = sample[:2]
    # Checked at another batch size than the traced one: a baked-in batch size cannot pass.
    checked = sample if len(sample) != len(example) else torch.cat([sample, sample[:1]])
    opset = max(cfg.opset, DYNAMO_MIN_OPSET)

    exporter = write_onnx(cpu_model, example, path, opset)
    try:
        report = check_parity(cpu_model, path, checked, cfg)
    except ExportParityError as err:
        if exporter == "dynamo":
            raise
        logger.warning(
            "the traced graph disagrees with PyTorch (%s); exporting with torch.export", err
        )
        exporter = write_onnx(cpu_model, example, path, opset, fast=False)
        try:
            report = check_parity(cpu_model, path, checked, cfg)
        except ExportParityError:
            path.unlink(missing_ok=True)  # a wrong graph must not outlive the error
            raise
    onnx.checker.check_model(str(path), full_check=True)
    written = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in written.opset_import if o.domain in ("", "ai.onnx"))
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


def write_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    opset: int,
    output_name: str = OUTPUT_NAME,
    fast: bool = True,
) -> str:
    """Write ``model`` (on CPU, in eval mode) to ``path`` with a dynamic batch axis.

    Returns the exporter that wrote it: ``"torchscript"`` (the fast path) or ``"dynamo"``. The
    caller checks the file against PyTorch and calls again with ``fast=False`` if it disagrees.
    Raises ``PipelineError`` when neither exporter can represent the model faithfully.
    """
    trace_error: Exception | None = None
    if fast:
        try:
            _export_torchscript(
                static_same_padding(model, example), example, path, opset, output_name
            )
            return "torchscript"
        except Exception as err:  # any tracer failure: the maintained exporter gets its turn
            trace_error = err
            logger.info(
                "tracing %s failed (%s); exporting with torch.export", type(model).__name__, err
            )
    try:
        _export_dynamo(model, example, path, opset, output_name)
    except torch.onnx.OnnxExporterError as err:
        path.unlink(missing_ok=True)
        cause = _ANSI.sub("", str(err.__cause__ or err).strip().splitlines()[0])
        frozen = (
            f"; tracing would freeze a data-dependent decision into the graph ({trace_error})"
            if isinstance(trace_error, _TracingUnsafe)
            else ""
        )
        raise PipelineError(
            f"cannot export {type(model).__name__} to ONNX at {path}: "
            f"torch.export failed ({cause}){frozen}"
        ) from err
    return "dynamo"


def static_same_padding(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of ``model`` whose TF-style 'same' convolutions pad by constants for ``example``'s size.

    timm's ``Conv2dSame`` computes its padding from the input shape on every call, which the tracer
    records as shape arithmetic; fixed for one input size it is an ordinary ``Pad`` + ``Conv``, the
    graph ONNX Runtime optimises best. A model without such layers comes back as it is.
    """
    targets = [name for name, m in model.named_modules() if isinstance(m, Conv2dSame)]
    if not targets:
        return model
    model = copy.deepcopy(model)
    sizes: dict[str, list[int]] = {}
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _m, inputs, name=name: sizes.__setitem__(name, list(inputs[0].shape[-2:]))
        )
        for name in targets
    ]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for hook in hooks:
            hook.remove()
    for name in targets:
        same = model.get_submodule(name)
        conv = nn.Conv2d(
            same.in_channels,
            same.out_channels,
            same.kernel_size,
            same.stride,
            0,
            same.dilation,
            same.groups,
            same.bias is not None,
        )
        conv.weight, conv.bias = same.weight, same.bias
        pad = pad_same_arg(
            sizes[name], list(same.kernel_size), list(same.stride), list(same.dilation)
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Sequential(nn.ZeroPad2d(pad), conv))
    return model


def cpu_eval_copy(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` on CPU in eval mode: itself when it already is, else a copy (the caller's stays)."""
    # Already a CPU model in eval mode (our own copy, or the caller's): nothing would change.
    on_cpu = all(t.device.type == "cpu" for t in (*model.parameters(), *model.buffers()))
    if on_cpu and not any(m.training for m in model.modules()):
        return model
    return copy.deepcopy(model).to("cpu").eval()


def _export_dynamo(
    model: nn.Module, example: torch.Tensor, path: Path, opset: int, output_name: str
) -> None:
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            **_graph_names(opset, output_name),
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,
            verbose=False,
        )


def _graph_names(opset: int, output_name: str) -> dict[str, object]:
    return {"input_names": [INPUT_NAME], "output_names": [output_name], "opset_version": opset}


def _export_torchscript(
    model: nn.Module, example: torch.Tensor, path: Path, opset: int, output_name: str
) -> None:
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            **_graph_names(opset, output_name),
            dynamo=False,
            dynamic_axes={INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}},
        )
    # A tracer warning means a Python-level decision was frozen into the graph.
    frozen = [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if frozen:
        path.unlink(missing_ok=True)
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
    cpu_model = cpu_eval_copy(model)
    sample = sample.detach().to("cpu", torch.float32)
    with torch.inference_mode():
        expected = cpu_model(sample).numpy()
    session = onnx_session(onnx_path)
    try:
        got = session.run([OUTPUT_NAME], {INPUT_NAME: sample.numpy()})[0]
    except Exception as err:  # ONNX Runtime's errors share no useful base class
        raise ExportParityError(
            f"ONNX Runtime cannot run {onnx_path} on a batch of {len(sample)}: {err}"
        ) from err
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
