"""Export task: ONNX with a dynamic batch axis, checked against PyTorch on held-out images."""

from __future__ import annotations

from pathlib import Path

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.common.config import PipelineConfig
from components.data.scan import read_manifest
from components.deploy import export
from components.engine.backbones import Backbone
from components.engine.images import Preprocessing, decode_batch
from components.training.models import load_model


def held_out_batch(usable_manifest: Path, prep: Preprocessing, size: int) -> torch.Tensor:
    """Real images from the validation split (test when present), as the parity check's input."""
    manifest = read_manifest(usable_manifest)
    rows = manifest[manifest["split"] == "test"]
    if rows.empty:
        rows = manifest[manifest["split"] == "val"]
    return torch.from_numpy(decode_batch(rows["path"].head(size).tolist(), prep))


@task(name="export-onnx", cache_policy=NO_CACHE)
def export_model(
    usable_manifest: Path,
    model_path: Path,
    prep: Preprocessing,
    backbone: Backbone,
    cfg: PipelineConfig,
    run_dir: Path,
) -> export.ExportResult:
    """Write ``model.onnx`` in the run folder; a parity mismatch fails the run (and is not retried)."""
    model, _, _ = load_model(model_path, backbone)
    sample = held_out_batch(usable_manifest, prep, cfg.export.parity_batch)
    result = export.export_onnx(model, sample, run_dir / "model.onnx", cfg.export)
    get_run_logger().info(
        "ONNX %s: max |diff| %.2e, argmax agreement %.3f on %d images",
        result.onnx_path,
        result.max_abs_diff,
        result.argmax_agreement,
        result.n_checked,
    )
    return result
