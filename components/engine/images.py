"""Opening user images safely and turning them into network inputs the same way everywhere.

Training, evaluation, export checks and serving all go through ``Preprocessing`` so a served model
sees exactly the pixels it was trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageMode, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T
from torchvision.transforms.functional import pil_modes_mapping


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


def open_image(
    path: Path | str | BinaryIO,
    max_pixels: int | None = None,
    keep_grey: bool = False,
    max_bytes: int | None = None,
) -> Image.Image:
    """Decode an image as upright 8-bit RGB (or 8-bit greyscale, if it is and ``keep_grey``).

    EXIF orientation is applied (phones store photos sideways), and CMYK, palette, 16-bit, RGBA and
    greyscale images are converted rather than rejected. Pillow's decompression-bomb guard stays on:
    a bomb raises ``PIL.Image.DecompressionBombError`` (also for what Pillow only warns about), and
    so does an image whose ``decoded_bytes`` exceed ``max_bytes``; both are read from the header.
    """
    with Image.open(path) as img:
        refuse_bombs(img, max_pixels, max_bytes, keep_grey)
        img.load()
        img = ImageOps.exif_transpose(img)
        return img if keep_grey and img.mode == "L" else to_rgb(img)


def decoded_bytes(img: Image.Image, keep_grey: bool = False) -> int:
    """Bytes an opened, not yet decoded image will take: width x height x bands x bytes per band
    as decoded, plus what ``to_rgb`` allocates on the way to RGB (nothing for RGB, or for greyscale
    kept grey; three RGBA images when transparency is composited).

    A 10 KB PNG can hold a 9000 x 9000 1-bit image: 81 MB decoded, 324 MB with its RGB copy.
    """
    width, height = img.size
    mode = ImageMode.getmode(img.mode)
    decoded = len(mode.bands) * np.dtype(mode.typestr).itemsize
    if img.mode == "RGB" or (keep_grey and img.mode == "L"):
        converted = 0
    elif img.mode in ("P", "RGBA", "LA", "PA"):
        converted = 3 * 4 + 3  # RGBA copy, white canvas, composite, then RGB
    elif img.mode.startswith("I"):
        converted = 8 + 1 + 3  # float64 scaling, 8-bit, RGB
    else:
        converted = 3
    return width * height * (decoded + converted)


def refuse_bombs(
    img: Image.Image,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
    keep_grey: bool = False,
) -> None:
    """Raise ``DecompressionBombError`` for an opened, not yet decoded image above ``max_pixels``
    (default: the count at which Pillow warns) or above ``max_bytes`` of ``decoded_bytes``.

    A check of the header's size rather than a warnings filter turned to "error": filters are
    process-wide, and decoding threads that swap them in and out race each other.
    """
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    width, height = img.size
    if limit is not None and width * height > limit:
        raise Image.DecompressionBombError(
            f"{width}x{height} = {width * height} pixels exceeds the limit of {limit}"
        )
    if max_bytes is not None and (need := decoded_bytes(img, keep_grey)) > max_bytes:
        raise Image.DecompressionBombError(
            f"{width}x{height} image (mode {img.mode}) would take {need} bytes decoded, "
            f"over the limit of {max_bytes}"
        )


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


def eval_pixels(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """RGB or greyscale ``img`` resized (shorter side to ``resize_size``) and centre-cropped, as
    RGB: HWC uint8.

    The same pixels as torchvision's ``Resize`` then ``CenterCrop`` (tested), done directly in
    Pillow: normalising a whole batch at once afterwards costs a tenth of per-image tensor ops, and
    a greyscale scan is resized as one channel before it becomes three (a third of the work).
    """
    w, h = img.size
    short = prep.resize_size
    new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    resample = pil_modes_mapping[T.InterpolationMode(prep.interpolation)]
    img = img.resize((new_w, new_h), resample)
    size = prep.image_size
    left, top = _crop_offset(new_w, size), _crop_offset(new_h, size)
    img = img.crop((left, top, left + size, top + size))  # outside the image: zero padding
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def _crop_offset(length: int, crop: int) -> int:
    # torchvision's rounding, including its left/top share of the padding for a too-small image
    return round((length - crop) / 2.0) if length >= crop else -((crop - length) // 2)


def normalise(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """NHWC uint8 pixels as the network's NCHW float32 input, in a few whole-batch passes."""
    mean = np.asarray(prep.mean, np.float32).reshape(1, 3, 1, 1) * 255
    scale = 1 / (np.asarray(prep.std, np.float32).reshape(1, 3, 1, 1) * 255)
    x = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)).astype(np.float32)
    x -= mean
    x *= scale
    return x


def decode_batch(paths: Sequence[Path | str], prep: Preprocessing) -> np.ndarray:
    """Image files as one normalised NCHW float32 batch, as the exported model expects it."""
    pixels = [eval_pixels(open_image(p, keep_grey=True), prep) for p in paths]
    return normalise(np.stack(pixels), prep)


class EvalTransform:
    """Deterministic resize, centre crop and normalisation of one RGB image, as a CHW tensor.

    The training, evaluation, export-check and serving path: every one sees ``decode_batch``'s
    pixels.
    """

    def __init__(self, prep: Preprocessing) -> None:
        self.prep = prep

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(normalise(eval_pixels(img, self.prep)[None], self.prep)[0])


class ImageFiles(Dataset):
    """Image files decoded and transformed in loader workers, so decoding overlaps the network."""

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        transform: Callable[[Image.Image], torch.Tensor],
    ) -> None:
        self.paths, self.labels, self.transform = list(paths), list(labels), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(open_image(self.paths[i])), self.labels[i]


def train_transform(prep: Preprocessing, flip: bool = True) -> T.Compose:
    """Light augmentation for fine-tuning: random resized crop, and horizontal flips for photos."""
    return T.Compose(
        [
            T.RandomResizedCrop(
                prep.image_size,
                scale=(0.6, 1.0),
                interpolation=T.InterpolationMode(prep.interpolation),
            ),
            T.RandomHorizontalFlip(0.5 if flip else 0.0),
            T.PILToTensor(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(prep.mean, prep.std),
        ]
    )


def preprocess_file(path: Path | str, prep: Preprocessing) -> np.ndarray:
    """One image file as a normalised float32 CHW array, as the exported model expects it."""
    return decode_batch([path], prep)[0]
