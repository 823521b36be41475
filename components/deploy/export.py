"""Exporting a trained classifier to one self-contained ONNX file, and proving it still agrees.

The graph is written by the engine's exporter (``engine.onnx_graphs.write_onnx``: the fast tracer,
``torch.export`` as the fallback) and then checked against PyTorch on real held-out images, at
another batch size than the traced one, so a baked-in batch size cannot pass. The model's contract
(labels, preprocessing, provenance: ``onnx_contract``) is written into the file before the check,
so the file checked is the file registered. Optionally a second graph takes uint8 NHWC pixels and
normalises inside (``export_uint8``), checked the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from components.common.config import ExportConfig
from components.common.errors import ExportParityError
from components.deploy import onnx_contract
from components.deploy.onnx_contract import ModelContract
from components.engine.images import Preprocessing
from components.engine.onnx_graphs import DYNAMO_MIN_OPSET, INPUT_NAME, cpu_eval_copy, write_onnx

logger = logging.getLogger(__name__)

OUTPUT_NAME = "logits"
__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "ExportResult",
    "NormalisingClassifier",
    "check_parity",
    "export_onnx",
    "export_uint8",
    "onnx_session",
]


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
    # The uint8 NHWC graph with normalisation inside (export.embed_preprocessing), when written.
    embedded_path: Path | None = None
    embedded_max_abs_diff: float | None = None


@dataclass(frozen=True)
class ParityReport:
    """ONNX Runtime against PyTorch on one batch."""

    max_abs_diff: float
    argmax_agreement: float
    provider: str
    n_checked: int


class NormalisingClassifier(torch.nn.Module):
    """``model`` behind its own input normalisation: uint8 NHWC RGB pixels in, logits out.

    The arithmetic is ``engine.images.normalise``'s (subtract 255 * mean, multiply by
    1 / (255 * std)), so the two graphs see the same floats for the same pixels.
    """

    def __init__(self, model: torch.nn.Module, prep: Preprocessing) -> None:
        super().__init__()
        self.model = model
        mean = torch.tensor(prep.mean, dtype=torch.float32).reshape(1, 3, 1, 1) * 255
        scale = 1 / (torch.tensor(prep.std, dtype=torch.float32).reshape(1, 3, 1, 1) * 255)
        self.register_buffer("mean", mean)
        self.register_buffer("scale", scale)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).to(torch.float32)
        return self.model((x - self.mean) * self.scale)


def export_onnx(
    model: torch.nn.Module,
    sample: torch.Tensor,
    path: Path,
    cfg: ExportConfig,
    contract: ModelContract | None = None,
) -> ExportResult:
    """Write ``model`` as a single ONNX file with a dynamic batch axis, then check parity on ``sample``.

    ``sample`` should be a real held-out batch (N, C, H, W): it fixes the spatial size of the graph
    and is what the parity check runs on. ``contract``, when given, goes into the file's
    ``metadata_props`` before the checks. The caller's model is neither moved nor switched to eval.
    Raises ``ExportParityError`` when ONNX Runtime disagrees with PyTorch beyond ``cfg.atol``.
    """
    if sample.ndim != 4:
        raise ValueError(f"sample must be a (N, C, H, W) batch, got shape {tuple(sample.shape)}")
    return _export_checked(cpu_eval_copy(model), sample.to(torch.float32), path, cfg, contract)


def export_uint8(
    model: torch.nn.Module,
    pixels: torch.Tensor,
    path: Path,
    prep: Preprocessing,
    cfg: ExportConfig,
    contract: ModelContract | None = None,
) -> ExportResult:
    """Like ``export_onnx`` for ``NormalisingClassifier(model, prep)``: the graph takes uint8
    ``pixels`` (N, H, W, 3) at the model's size, as ``engine.images.eval_pixels`` makes them."""
    if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != torch.uint8:
        raise ValueError(
            f"pixels must be a uint8 (N, H, W, 3) batch, got {pixels.dtype} {tuple(pixels.shape)}"
        )
    wrapped = NormalisingClassifier(cpu_eval_copy(model), prep).eval()
    if contract is not None:
        contract = replace(
            contract,
            input_format=onnx_contract.UINT8_NHWC,
            preprocessing={**contract.preprocessing, "layout": "NHWC", "normalised_inside": True},
        )
    return _export_checked(wrapped, pixels, path, cfg, contract)


def _export_checked(
    cpu_model: torch.nn.Module,
    sample: torch.Tensor,
    path: Path,
    cfg: ExportConfig,
    contract: ModelContract | None,
) -> ExportResult:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sample = sample.detach().to("cpu")
    example = sample[:2]
    # Checked at another batch size than the traced one: a baked-in batch size cannot pass.
    checked = sample if len(sample) != len(example) else torch.cat([sample, sample[:1]])
    opset = max(cfg.opset, DYNAMO_MIN_OPSET)

    def write(fast: bool) -> str:
        exporter = write_onnx(cpu_model, example, path, opset, OUTPUT_NAME, fast=fast)
        if contract is not None:
            onnx_contract.stamp(path, contract)
        return exporter

    exporter = write(fast=True)
    try:
        report = check_parity(cpu_model, path, checked, cfg)
    except ExportParityError as err:
        if exporter == "dynamo":
            raise
        logger.warning(
            "the traced graph disagrees with PyTorch (%s); exporting with torch.export", err
        )
        exporter = write(fast=False)
        try:
            report = check_parity(cpu_model, path, checked, cfg)
        except ExportParityError:
            path.unlink(missing_ok=True)  # a wrong graph must not outlive the error
            raise
    onnx.checker.check_model(str(path), full_check=True)
    opset = onnx_contract.graph_opset(onnx.load(str(path), load_external_data=False))
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


def check_parity(
    model: torch.nn.Module, onnx_path: Path, sample: torch.Tensor, cfg: ExportConfig
) -> ParityReport:
    """Run ``sample`` through PyTorch (on CPU, eval) and ONNX Runtime and compare the logits.

    A floating-point sample is compared as float32; an integer one (uint8 pixels) as it is.

    Raises ``ExportParityError`` naming both numbers and the file when any prediction differs or
    the largest absolute logit difference exceeds ``cfg.atol``.
    """
    cpu_model = cpu_eval_copy(model)
    sample = sample.detach().to("cpu")
    if sample.is_floating_point():
        sample = sample.to(torch.float32)
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
