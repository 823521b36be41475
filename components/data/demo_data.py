"""The embedded demo dataset: scikit-learn's bundled handwritten digits written as an image folder.

The 8x8 scans are enlarged to 32x32 (bicubic) so they pass the default minimum image size; they stay
real scans, very unlike ImageNet photos, which makes the demo exercise the "different" branch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def materialise_digits(dest: Path, per_class: int | None = None, size: int = 32) -> Path:
    """Write ``dest/<digit>/<n>.png`` (existing files are left alone) and return ``dest``."""
    digits = load_digits()
    seen: dict[int, int] = {}
    for pixels, target in zip(digits.images, digits.target, strict=True):
        label = int(target)
        if per_class is not None and seen.get(label, 0) >= per_class:
            continue
        n = seen[label] = seen.get(label, 0) + 1
        path = dest / str(label) / f"{n:04d}.png"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray((255 - pixels * (255 / 16)).astype(np.uint8), mode="L")
        img.resize((size, size), Image.Resampling.BICUBIC).save(path)
    return dest
