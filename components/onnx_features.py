"""The frozen-feature pass as one ONNX graph, run by ONNX Runtime.

On CPU, ONNX Runtime runs the backbone several times faster than channels-last PyTorch (twice as
fast end to end, decoding included), and the feature pass is the frozen cases' whole cost. The graph
returns every cut point's pooled features concatenated, exactly the rows ``FeatureCache`` stores, so
features from either engine are interchangeable. It is exported once per backbone and
preprocessing, next to that cache.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import nn

from components.backbones import Backbone
from components.errors import ExportParityError
from components.export import DYNAMO_MIN_OPSET, INPUT_NAME, _cpu_eval_copy
from components.features import pooled_features
from components.images import Preprocessing

log = logging.getLogger(__name__)

FILE_NAME = "extractor.onnx"
OUTPUT_NAME = "features"
# Largest |ORT - PyTorch| accepted on float32 features; the cache's float16 rounding is ~1e-3.
PARITY_ATOL = 1e-3


class PooledFeatureStack(nn.Module):
    """All cut points' pooled features side by side: one cache row per image."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(pooled_features(self.model, x), dim=1)


def extractor_onnx(backbone: Backbone, prep: Preprocessing, folder: Path) -> Path:
    """``folder/extractor.onnx``, exported on first use and reused afterwards.

    The file is written under a temporary name and renamed only after ONNX Runtime has matched
    PyTorch on a random batch, so a killed run or a wrong graph never leaves a file that later calls
    would trust. Raises ``ExportParityError`` when the graph disagrees.
    """
    path = folder / FILE_NAME
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"extractor-{uuid.uuid4().hex}.tmp.onnx"
    wrapper = PooledFeatureStack(_cpu_eval_copy(backbone.model)).eval()
    try:
        with torch.no_grad():
            torch.onnx.export(
                wrapper,
                (torch.zeros(2, 3, prep.image_size, prep.image_size),),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=DYNAMO_MIN_OPSET,
                dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                external_data=False,
                verbose=False,
            )
        diff = _parity(wrapper, tmp, prep.image_size)
        if diff > PARITY_ATOL:
            raise ExportParityError(
                f"feature graph {path} disagrees with PyTorch: max |diff| {diff:.2e} "
                f"(allowed {PARITY_ATOL:.0e})"
            )
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("exported feature graph %s (max |diff| vs PyTorch %.1e)", path, diff)
    return path


def _parity(wrapper: nn.Module, path: Path, image_size: int) -> float:
    # Three inputs, not the two it was traced with: this also proves the batch axis is dynamic.
    x = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = wrapper(x).numpy()
    # On CPU: this checks the graph, not a GPU provider's reduced-precision kernels.
    got = feature_session(path, torch.device("cpu")).run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    if got.shape != expected.shape:
        return float("inf")
    return float(np.max(np.abs(got - expected)))


def available_cpus() -> int:
    """CPUs this process may run on (a container or taskset limit, not the host's count)."""
    return len(os.sched_getaffinity(0))


def feature_session(path: Path, device: torch.device | None = None) -> onnxruntime.InferenceSession:
    """A session on CUDA when PyTorch sees a GPU and ORT has the provider, else on every usable CPU.

    ``device`` set to CPU keeps it on the CPU even where a GPU exists. Measured on 2 CPUs: one
    intra-op thread per usable CPU (a single thread was 15% slower end to end), sequential execution
    (the parallel executor was slower still), and threads that sleep instead of spinning when idle,
    leaving those cycles to the loader workers decoding the next batch (5-20% faster end to end).
    """
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = available_cpus()
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
