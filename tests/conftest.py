"""Shared fixtures: small real image folders made in tmp dirs, and one Prefect test harness."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from components.data.demo_data import materialise_digits


@pytest.fixture(autouse=True)
def _seeded_torch() -> None:
    """Every test starts from the same torch seed, so random inputs cannot make a result flaky."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's real digit scans, 40 per class, as ROOT/<class>/*.png."""
    return materialise_digits(tmp_path_factory.mktemp("digits") / "digits", per_class=40)


def write_photo(path: Path, seed: int, size: tuple[int, int] = (96, 72), mode: str = "RGB") -> Path:
    """A smooth random colour image (textured enough to be decoded and embedded like a photo)."""
    rng = np.random.default_rng(seed)
    base = rng.random((size[1] // 8 + 1, size[0] // 8 + 1, 3))
    img = Image.fromarray((base * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.convert(mode).save(path)
    return path


@pytest.fixture
def photo_root(tmp_path: Path) -> Path:
    """Two classes of 8 JPEGs each, ROOT/<class>/*.jpg."""
    root = tmp_path / "photos"
    for c, label in enumerate(("cats", "dogs")):
        for i in range(8):
            write_photo(root / label / f"{i}.jpg", seed=100 * c + i)
    return root


def tiny_classifier(num_classes: int) -> torch.nn.Module:
    """A seeded, very small image classifier for tests that need any real network quickly."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, num_classes),
    ).eval()
