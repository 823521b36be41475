"""The frozen-feature pass as one ONNX graph, run by ONNX Runtime.

On CPU, ONNX Runtime runs the backbone several times faster than channels-last PyTorch (2.5-3x as
fast end to end, decoding included), and the feature pass is the frozen cases' whole cost. The graph
returns every cut point's pooled features concatenated, exactly the rows ``FeatureCache`` stores, so
features from either engine are interchangeable. It is exported once per backbone and
preprocessing, next to that cache.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import nn

from components.backbones import Backbone
from components.errors import ExportParityError, PipelineError
from components.export import DYNAMO_MIN_OPSET, INPUT_NAME, cpu_eval_copy, write_onnx
from components.features import pooled_features, with_progress
from components.images import Preprocessing, decode_batch

log = logging.getLogger(__name__)

FILE_NAME = "extractor.onnx"
OUTPUT_NAME = "features"
# Largest |ORT - PyTorch| / max(1, |PyTorch|) accepted: absolute for features of order 1 (the
# cache's float16 rounding is ~1e-3), relative for large values such as mean squared activations.
PARITY_RTOL = 1e-3


class PooledFeatureStack(nn.Module):
    """All cut points' pooled features side by side: one cache row per image."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(pooled_features(self.model, x), dim=1)


def extractor_onnx(backbone: Backbone, prep: Preprocessing, folder: Path) -> Path:
    """``folder/extractor.onnx``: the pooled-features graph, exported on first use."""
    wrapper = PooledFeatureStack(cpu_eval_copy(backbone.model)).eval()
    return cached_graph(wrapper, prep.image_size, folder / FILE_NAME, OUTPUT_NAME)


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


def stream_plan(n_images: int, batch_size: int, cpus: int) -> tuple[int, int]:
    """How many batches run at once, and how many ONNX Runtime threads each gets.

    Measured on 2 CPUs at 224 px: one single-threaded stream per CPU, each decoding a batch and then
    running it, beat one two-threaded session fed by two loader processes by 1.2-1.4x end to end.
    One stream's decoding fills the other's gaps, and no ONNX Runtime thread waits at a barrier for
    a sibling that a decoder pre-empted. (At 64 px the streams need ``images.decode_batch``'s cheap
    decoding to win; they do, 1.5x.) Spare CPUs (fewer batches than CPUs) go to the streams' threads.
    """
    batches = max(1, -(-n_images // batch_size))
    streams = min(cpus, batches)
    return streams, max(1, cpus // streams)


def run_streams(
    session: onnxruntime.InferenceSession,
    paths: Sequence[str],
    prep: Preprocessing,
    batch_size: int,
    streams: int,
    dtype: type = np.float16,
) -> np.ndarray:
    """The session's first output for every image in ``paths``, row by row.

    ``streams`` threads each decode a batch and run it. Threads suffice: Pillow's decoders and
    resampling, NumPy's normalisation and ONNX Runtime all release the GIL while they work.
    """
    name = session.get_inputs()[0].name

    def rows(batch: Sequence[str]) -> np.ndarray:
        return session.run(None, {name: decode_batch(batch, prep)})[0].astype(dtype)

    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    pool = ThreadPoolExecutor(streams, thread_name_prefix="embed")
    try:
        return np.concatenate(
            list(with_progress(pool.map(rows, batches), len(paths), len(batches)))
        )
    finally:
        pool.shutdown(cancel_futures=True)  # on an error, queued batches are dropped, not run


def onnx_rows(
    export: Callable[[], Path],
    fallback: str,
    paths: Sequence[str],
    prep: Preprocessing,
    batch_size: int,
    device: torch.device,
    dtype: type = np.float16,
) -> np.ndarray | None:
    """Every image's row from the graph ``export`` returns, in streams sized to the machine; None
    (after a warning saying ``fallback``) when the graph cannot be trusted."""
    streams, threads = stream_plan(len(paths), batch_size, available_cpus())
    try:
        session = feature_session(export(), device, threads)
    except (PipelineError, torch.onnx.OnnxExporterError) as err:
        log.warning("%s: %s", fallback, err)  # the caller computes the same rows in PyTorch
        return None
    return run_streams(session, paths, prep, batch_size, streams, dtype)


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
