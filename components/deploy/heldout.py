"""The held-out images a promotion is judged on, and an exported model's predictions on them.

Both models of a comparison are scored here the same way: their registered ONNX files in ONNX
Runtime, each with its own preprocessing, on the same files, so the comparison is of the artefacts
that would be served and not of two training runs' own evaluation code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.deploy.export import onnx_session
from components.engine.images import Preprocessing, decode_batch

SCORING_BATCH = 64


@dataclass(frozen=True)
class HeldOut:
    """Images and their true labels, from one split of this run's data."""

    split: str  # "test", else "val"
    paths: tuple[str, ...]
    labels: tuple[str, ...]
    source: str  # where the images come from (the data folder), for MLflow's dataset record


def held_out(manifest: pd.DataFrame, source: str) -> HeldOut:
    """The test split of the usable manifest, or the validation split when there is no test."""
    for split in ("test", "val"):
        rows = manifest[manifest["split"] == split]
        if not rows.empty:
            return HeldOut(
                split,
                tuple(rows["path"].astype(str)),
                tuple(rows["label"].astype(str)),
                source,
            )
    return HeldOut("none", (), (), source)


def predict_labels(
    onnx_path: Path,
    labels: list[str],
    preprocessing: dict[str, Any],
    paths: tuple[str, ...],
    batch: int = SCORING_BATCH,
) -> list[str]:
    """The predicted label of each image, by the model's arg-max, decoded with its preprocessing."""
    prep = Preprocessing.from_dict(preprocessing)
    session = onnx_session(onnx_path)
    input_name = session.get_inputs()[0].name
    predicted: list[str] = []
    for start in range(0, len(paths), batch):
        x = decode_batch(paths[start : start + batch], prep)
        logits = session.run(None, {input_name: x})[0]
        predicted.extend(labels[i] for i in np.asarray(logits).argmax(axis=1))
    return predicted
