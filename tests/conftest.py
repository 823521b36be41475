"""Shared fixtures: small real image folders made in tmp dirs, and one Prefect test harness."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from components.data.demo_data import materialise_digits


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker (and every process it starts) gets its share of the CPUs
    for torch's threads. Two workers that each run torch on every CPU spin at barriers while the
    other holds a core: on 2 CPUs the fine-tune tests took 411 s on two workers with the default
    and 65 s with one thread each."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(share))  # read by the processes it starts
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seeded_torch() -> None:
    """Every test starts from the same torch seed, so random inputs cannot make a result flaky."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's real digit scans, 40 per class, as ROOT/<class>/*.png."""
    return materialise_digits(tmp_path_factory.mktemp("digits") / "digits", per_class=40)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``run.cache_dir`` for flow tests that do not test the cache itself: the backbone's
    graphs are exported and the digits embedded once, not once per test."""
    return tmp_path_factory.mktemp("shared-cache")


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


def png_bytes(size: tuple[int, int] = (48, 40), seed: int = 0, mode: str = "RGB") -> bytes:
    """A small random PNG, as the bytes a client would upload."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def register_tiny_versions(
    tracking_uri: str, name: str, labels: list[str], image_sizes: tuple[int, ...], alias: str
) -> list[torch.nn.Module]:
    """Register one tiny classifier per image size as versions 1, 2, ... of ``name`` in a real
    MLflow store, with ``alias`` on version 1; returns the PyTorch models in version order."""
    # Imported here: most test sessions never touch MLflow, and importing it costs seconds.
    from mlflow import MlflowClient

    from components.common.config import ExportConfig, TrackingConfig
    from components.deploy import tracking
    from components.deploy.export import export_onnx
    from components.engine.images import Preprocessing

    cfg = TrackingConfig(tracking_uri=tracking_uri, experiment="serve-tests")
    models = []
    for i, size in enumerate(image_sizes):
        torch.manual_seed(i)
        model = tiny_classifier(len(labels))
        for p in model.parameters():  # seeded apart, so each version answers differently
            p.data += 0.5 * torch.randn_like(p) * (i + 1)
        folder = Path(tracking_uri.removeprefix("sqlite:///")).parent / f"export-{i}"
        onnx_path = export_onnx(
            model, torch.randn(4, 3, size, size), folder / "model.onnx", ExportConfig()
        ).onnx_path
        prep = Preprocessing(image_size=size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        run_id = tracking.start_run(cfg, folder, f"v{i + 1}", {})
        tracking.register_onnx_model(run_id, onnx_path, name, labels, prep.to_dict(), tracking_uri)
        tracking.finish_run(run_id, tracking_uri=tracking_uri)
        models.append(model)
    MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).set_registered_model_alias(
        name, alias, "1"
    )
    return models


def bomb_png(width: int = 9000, height: int = 9000) -> bytes:
    """A ~10 KB 1-bit PNG of ``width x height`` black pixels, written without decoding anything."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" * (1 + -(-width // 8))  # filter byte + packed bits
    pixels = zlib.compress(row * height, 9)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def dead_pid() -> int:
    """The PID of a process that ran and was reaped: nothing lives under it now."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(done.stdout)


@pytest.fixture(scope="session")
def prefect_backend() -> Iterator[None]:
    """One real (temporary) Prefect server and database for the whole session, started by the
    first test folder that asks for it (flows/ and tasks/ do, for every test they hold)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
