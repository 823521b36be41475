"""Backbone graphs as ONNX files: writing them fast and faithfully, and opening sessions on them.

Two exporters, fastest first. The TorchScript tracer runs on a copy whose timm TF-style 'same'
padding has been fixed for the input size (``static_same_padding``): on Lite0 it writes the graph
in 0.4 s where the torch.export-based exporter (``dynamo=True``) takes 6.5-7 s, and ONNX Runtime
runs both graphs at the same speed. Tracer warnings are errors, so a data-dependent decision is
never frozen into the graph; any failure of the tracer, or a traced graph that disagrees with
PyTorch, hands over to ``torch.export``, PyTorch's maintained path, which keeps the batch axis
symbolic or refuses. Both write opset 18 or later (the dynamo translations start at 18; asking for
17 ends in a failed down-conversion of ``Pad``). The engine's feature graphs and the deployed
classifier are both written here.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import uuid
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.padding import pad_same_arg
from torch import nn

from components.common.errors import ExportParityError, PipelineError

log = logging.getLogger(__name__)

INPUT_NAME = "input"
# Lowest opset the dynamo exporter translates to without a lossy version conversion.
DYNAMO_MIN_OPSET = 18
# Largest |ORT - PyTorch| / max(1, |PyTorch|) accepted for a cached engine graph: absolute for
# features of order 1 (the cache's float16 rounding is ~1e-3), relative for large values such as
# mean squared activations.
PARITY_RTOL = 1e-3
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def write_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    opset: int,
    output_name: str,
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
            log.info(
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


def cached_graph(wrapper: nn.Module, image_size: int, path: Path, output_name: str) -> Path:
    """``path``, exported from ``wrapper`` (CPU, eval) on first use and reused afterwards.

    The file is written under a temporary name and renamed only after ONNX Runtime has matched
    PyTorch on a random batch, so a killed run or a wrong graph never leaves a file that later calls
    would trust. Raises ``ExportParityError`` when the graph disagrees.
    """
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.stem}-{uuid.uuid4().hex}.tmp.onnx"
    example = torch.zeros(2, 3, image_size, image_size)
    try:
        exporter = write_onnx(wrapper, example, tmp, DYNAMO_MIN_OPSET, output_name)
        diff = _parity(wrapper, tmp, image_size, output_name)
        if diff > PARITY_RTOL and exporter != "dynamo":
            log.warning("traced graph %s disagrees (%.2e); using torch.export", path.name, diff)
            write_onnx(wrapper, example, tmp, DYNAMO_MIN_OPSET, output_name, fast=False)
            diff = _parity(wrapper, tmp, image_size, output_name)
        if diff > PARITY_RTOL:
            raise ExportParityError(
                f"ONNX graph {path} disagrees with PyTorch: relative difference {diff:.2e} "
                f"(allowed {PARITY_RTOL:.0e})"
            )
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("exported %s (relative difference from PyTorch %.1e)", path, diff)
    return path


def _parity(wrapper: nn.Module, path: Path, image_size: int, output_name: str) -> float:
    # Three inputs, not the two it was traced with: this also proves the batch axis is dynamic.
    x = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = wrapper(x).numpy()
    # On CPU: this checks the graph, not a GPU provider's reduced-precision kernels.
    try:
        session = feature_session(path, torch.device("cpu"))
        got = session.run([output_name], {INPUT_NAME: x.numpy()})[0]
    except Exception as err:  # ONNX Runtime's errors share no useful base class
        log.warning("ONNX Runtime cannot run %s on a batch of 3: %s", path, err)
        return float("inf")
    if got.shape != expected.shape:
        return float("inf")
    return float(np.max(np.abs(got - expected) / np.maximum(1.0, np.abs(expected))))


def available_cpus() -> int:
    """CPUs this process may run on (a container or taskset limit, not the host's count)."""
    return len(os.sched_getaffinity(0))


def feature_session(
    path: Path, device: torch.device | None = None, threads: int | None = None
) -> onnxruntime.InferenceSession:
    """A session on CUDA when PyTorch sees a GPU and ORT has the provider, else on the CPU.

    ``device`` set to CPU keeps it on the CPU even where a GPU exists. ``threads`` intra-op threads
    (default: every usable CPU), sequential execution (the parallel executor was slower on 2 CPUs),
    and threads that sleep instead of spinning when idle, leaving those cycles to decoding (5-20%
    faster end to end).
    """
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or available_cpus()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list[str] = ["CPUExecutionProvider"]
    wants_cuda = device is None or device.type == "cuda"
    if (
        wants_cuda
        and torch.cuda.is_available()
        and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    ):
        providers.insert(0, "CUDAExecutionProvider")
    return onnxruntime.InferenceSession(str(path), options, providers=providers)
