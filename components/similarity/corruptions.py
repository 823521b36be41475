"""Synthetic domain shift of graded strength: blur, noise and colour removal.

Used to check that the similarity score behaves like a distance (it must fall as the corruption
grows) and to show users what a given score means on their own images. Copies are written
elsewhere; the user's files are never modified.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from components.engine.images import open_image

CORRUPTIONS = ("blur", "noise", "greyscale")
SEVERITIES = 5  # 1..5; 0 is the clean image
_BLUR_RADIUS = (0.0, 1.0, 2.0, 3.0, 4.5, 6.0)  # pixels, at ~256-pixel images
_NOISE_SIGMA = (0.0, 10.0, 20.0, 35.0, 50.0, 70.0)  # on the 0-255 scale
# Share of colour removed. Mild desaturation is no shift away from ImageNet photos (their colours
# are no more saturated than ImageNet's), so the grades concentrate where colour actually goes.
_DESATURATION = (0.0, 0.5, 0.7, 0.85, 0.95, 1.0)


def corrupt(img: Image.Image, kind: str, severity: int, seed: int = 0) -> Image.Image:
    """``img`` (RGB) with corruption ``kind`` at ``severity`` 0 (none) to 5 (strongest)."""
    if kind not in CORRUPTIONS or not 0 <= severity <= SEVERITIES:
        raise ValueError(f"unknown corruption {kind!r} or severity {severity} outside 0-5")
    if severity == 0:
        return img.copy()
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(_BLUR_RADIUS[severity]))
    if kind == "noise":
        rng = np.random.default_rng(seed)
        pixels = np.asarray(img, dtype=np.float32)
        noisy = pixels + rng.normal(0.0, _NOISE_SIGMA[severity], pixels.shape)
        return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return ImageEnhance.Color(img).enhance(1.0 - _DESATURATION[severity])


def write_corrupted(
    paths: list[str], kind: str, severity: int, dest: Path, seed: int = 0
) -> list[str]:
    """Corrupted PNG copies of ``paths`` under ``dest`` (lossless, so JPEG does not add its own)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i, path in enumerate(paths):
        target = dest / f"{i:05d}.png"
        corrupt(open_image(path), kind, severity, seed + i).save(target)
        out.append(str(target))
    return out
