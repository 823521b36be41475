"""Opening user images safely and turning them into network inputs the same way everywhere.

Training, evaluation, export checks and serving all go through ``Preprocessing`` so a served model
sees exactly the pixels it was trained on.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2 as T


@dataclass(frozen=True)
class Preprocessing:
    """Resize, crop and normalisation of one model's inputs (recorded with every registered model)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 0.875
    interpolation: str = "bicubic"

    @property
    def resize_size(self) -> int:
        return round(self.image_size / self.crop_pct)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "resize_size": self.resize_size,
            "channels": "RGB",
            "layout": "NCHW",
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        return cls(
            image_size=int(values["image_size"]),
            mean=tuple(values["mean"]),
            std=tuple(values["std"]),
            crop_pct=float(values.get("crop_pct", 0.875)),
            interpolation=str(values.get("interpolation", "bicubic")),
        )


def open_image(path: Path | str, max_pixels: int | None = None) -> Image.Image:
    """Decode an image as upright 8-bit RGB.

    EXIF orientation is applied (phones store photos sideways), and CMYK, palette, 16-bit, RGBA and
    greyscale images are converted rather than rejected. Pillow's decompression-bomb guard stays on:
    a bomb raises ``PIL.Image.DecompressionBombError`` (also for what Pillow only warns about).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            pixels = img.size[0] * img.size[1]
            if max_pixels is not None and pixels > max_pixels:
                raise Image.DecompressionBombError(
                    f"{pixels} pixels exceeds the limit of {max_pixels} (possible decompression bomb)"
                )
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB, compositing transparency on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() or 1.0
        return Image.fromarray((arr / top * 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def _interp(name: str) -> T.InterpolationMode:
    return T.InterpolationMode(name)


def eval_transform(prep: Preprocessing) -> T.Compose:
    """Deterministic resize, centre crop and normalisation (the export and serving path too)."""
    return T.Compose(
        [
            T.Resize(prep.resize_size, interpolation=_interp(prep.interpolation), antialias=True),
            T.CenterCrop(prep.image_size),
            T.PILToTensor(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(prep.mean, prep.std),
        ]
    )


def train_transform(prep: Preprocessing, flip: bool = True) -> T.Compose:
    """Light augmentation for fine-tuning: random resized crop, and horizontal flips for photos."""
    return T.Compose(
        [
            T.RandomResizedCrop(
                prep.image_size, scale=(0.6, 1.0), interpolation=_interp(prep.interpolation)
            ),
            T.RandomHorizontalFlip(0.5 if flip else 0.0),
            T.PILToTensor(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(prep.mean, prep.std),
        ]
    )


def preprocess_file(path: Path | str, prep: Preprocessing) -> np.ndarray:
    """One image file as a normalised float32 CHW array, as the exported model expects it."""
    return eval_transform(prep)(open_image(path)).numpy()
