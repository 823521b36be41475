"""One served model version: its ONNX Runtime session, labels, preprocessing and version, together.

The server swaps one ``OnnxClassifier`` reference when the registry alias moves, so a request
that started on a version finishes on it: its pixels were made with that version's preprocessing
and its logits come from that version's session.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from components.deploy.export import INPUT_NAME, OUTPUT_NAME
from components.engine.images import Preprocessing, eval_pixels, normalise, open_image, to_rgb
from components.engine.onnx_graphs import feature_session

ImageInput = Image.Image | Path | bytes


class OnnxClassifier:
    """Labels and class probabilities for images, from an ONNX model and its preprocessing.

    ``threads`` sets ONNX Runtime's intra-op threads (default: every usable CPU); ``name`` and
    ``version`` are what the server reports (the registered model's, when it came from one).
    """

    def __init__(
        self,
        onnx_path: Path,
        labels: Sequence[str],
        preprocessing: Preprocessing,
        *,
        name: str = "model",
        version: str = "1",
        threads: int | None = None,
    ) -> None:
        self.onnx_path = Path(onnx_path)
        self.labels = list(labels)
        self.preprocessing = preprocessing
        self.name = name
        self.version = str(version)
        self.session = feature_session(self.onnx_path, None, threads)  # CUDA where usable
        inputs = {i.name: i for i in self.session.get_inputs()}
        if INPUT_NAME not in inputs:
            raise ValueError(f"{onnx_path} has no input named {INPUT_NAME!r} ({sorted(inputs)})")
        self.input_name = INPUT_NAME
        self.output_name = OUTPUT_NAME
        size = preprocessing.image_size
        self.input_shape = (3, size, size)  # per image; the batch axis is dynamic
        classes = self.session.get_outputs()[0].shape[-1]
        if isinstance(classes, int) and classes != len(self.labels):
            raise ValueError(
                f"{onnx_path} outputs {classes} classes but {len(self.labels)} labels were given"
            )

    @classmethod
    def from_registry(
        cls, model_uri: str, tracking_uri: str, threads: int | None = None
    ) -> OnnxClassifier:
        """Load a registered version (e.g. ``models:/flowers@champion``) with its labels."""
        from components.deploy.tracking import load_registered, resolve_model_version

        name, version = resolve_model_version(model_uri, tracking_uri)
        onnx_path, labels, prep = load_registered(f"models:/{name}/{version}", tracking_uri)
        return cls(
            onnx_path,
            labels,
            Preprocessing.from_dict(prep),
            name=name,
            version=version,
            threads=threads,
        )

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw outputs for a normalised NCHW float32 batch (ONNX Runtime's ``run`` is thread-safe)."""
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def warm_up(self) -> None:
        """One run on zeros, so the first request does not pay for ONNX Runtime's allocations."""
        self.logits(np.zeros((1, *self.input_shape), np.float32))

    def predictions(self, logits: np.ndarray) -> list[dict[str, Any]]:
        """One ``{"label", "score", "probabilities": {label: p}}`` per row of logits."""
        results = []
        for row in softmax(logits):
            best = int(row.argmax())
            results.append(
                {
                    "label": self.labels[best],
                    "score": float(row[best]),
                    "probabilities": {
                        lab: float(p) for lab, p in zip(self.labels, row, strict=True)
                    },
                }
            )
        return results

    def predict(
        self, images: Sequence[ImageInput], max_pixels: int | None = None
    ) -> list[dict[str, Any]]:
        """Predictions for images in input order, decoded as in training (in-process use).

        Undecodable input raises ``PIL.UnidentifiedImageError``; a decompression bomb raises
        ``PIL.Image.DecompressionBombError``.
        """
        if not images:
            return []
        prep = self.preprocessing
        pixels = [eval_pixels(_load(img, max_pixels), prep) for img in images]
        return self.predictions(self.logits(normalise(np.stack(pixels), prep)))


def _load(image: ImageInput, max_pixels: int | None) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image))
    if isinstance(image, bytes | bytearray):
        return open_image(io.BytesIO(image), max_pixels, keep_grey=True)
    return open_image(image, max_pixels, keep_grey=True)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities per row, computed in float64 (no overflow for large logits)."""
    z = logits.astype(np.float64)
    probs = np.exp(z - z.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)
