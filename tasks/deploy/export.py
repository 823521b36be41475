"""Export task: ONNX with a dynamic batch axis and the model's contract inside, checked against
PyTorch on held-out images (and, when configured, the uint8 graph that normalises inside)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.common.config import PipelineConfig
from components.data.digest import data_digest
from components.data.scan import read_manifest
from components.deploy import export
from components.deploy.onnx_contract import ModelContract
from components.engine.backbones import Backbone
from components.engine.images import Preprocessing, eval_pixels, normalise, open_image
from components.training.models import load_model

UINT8_FILE = "model_uint8.onnx"


def held_out_pixels(usable_manifest: Path, prep: Preprocessing, size: int) -> np.ndarray:
    """Real images from the test split (validation when there is none) as uint8 NHWC pixels at
    the model's size: the parity checks' input."""
    manifest = read_manifest(usable_manifest)
    rows = manifest[manifest["split"] == "test"]
    if rows.empty:
        rows = manifest[manifest["split"] == "val"]
    paths = rows["path"].head(size).tolist()
    return np.stack([eval_pixels(open_image(p, keep_grey=True), prep) for p in paths])


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
    model, spec, labels = load_model(model_path, backbone)
    contract = ModelContract(
        labels=tuple(labels),
        preprocessing=prep.to_dict(),
        backbone=backbone.name,
        backbone_weights_sha256=backbone.weights_sha256,
        case=spec.case,
        cut=spec.cut,
        data_digest=data_digest(read_manifest(usable_manifest)),
    )
    pixels = held_out_pixels(usable_manifest, prep, cfg.export.parity_batch)
    sample = torch.from_numpy(normalise(pixels, prep))
    result = export.export_onnx(model, sample, run_dir / "model.onnx", cfg.export, contract)
    logger = get_run_logger()
    logger.info(
        "ONNX %s: max |diff| %.2e, argmax agreement %.3f on %d images",
        result.onnx_path,
        result.max_abs_diff,
        result.argmax_agreement,
        result.n_checked,
    )
    if cfg.export.embed_preprocessing:
        embedded = export.export_uint8(
            model, torch.from_numpy(pixels), run_dir / UINT8_FILE, prep, cfg.export, contract
        )
        result = replace(
            result, embedded_path=embedded.onnx_path, embedded_max_abs_diff=embedded.max_abs_diff
        )
        logger.info(
            "uint8 NHWC graph %s: max |diff| %.2e", embedded.onnx_path, embedded.max_abs_diff
        )
    return result
