"""Fuzzing the scan and decode path: damaged image files are reported, never a crash or a hang.

Real PNG, JPEG (with an EXIF orientation), GIF, TIFF and WebP files are made with Pillow, then
replaced by random bytes, truncated, or mutated in the header or anywhere. Whatever the scan calls
decodable must also decode the way training and serving decode it.
"""

from __future__ import annotations

import io
import tempfile
from datetime import timedelta
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from components.common.config import DataConfig, ValidationConfig
from components.data.scan import inspect_file, scan_folder
from components.engine.images import Preprocessing, decode_batch
from tests.conftest import write_photo

# Pillow warns about the damage it reads past (corrupt EXIF, short tags); that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
PREP = Preprocessing(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
FUZZ = settings(
    max_examples=60,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow],
)


@cache
def originals() -> dict[str, bytes]:
    """One real, small file per format (built once; bytes, so no test can change them)."""
    rng = np.random.default_rng(0)
    pixels = (rng.random((30, 40, 3)) * 255).astype(np.uint8)
    rgb = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate on decode
    made = {
        "png": (rgb.convert("RGBA"), {"format": "PNG"}),
        "jpg": (rgb, {"format": "JPEG", "quality": 80, "exif": exif.tobytes()}),
        "gif": (rgb.convert("P"), {"format": "GIF"}),
        "tif": (rgb, {"format": "TIFF", "compression": "tiff_lzw"}),
        "webp": (rgb, {"format": "WEBP", "quality": 80}),
    }
    out = {}
    for ext, (img, options) in made.items():
        buffer = io.BytesIO()
        img.save(buffer, **options)
        out[ext] = buffer.getvalue()
    return out


@st.composite
def damaged_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """(extension, bytes): random, truncated, header-mutated or anywhere-mutated real files."""
    ext = draw(st.sampled_from(sorted(originals())))
    good = originals()[ext]
    kind = draw(st.sampled_from(("random", "magic+random", "truncate", "header", "anywhere")))
    if kind == "random":
        return ext, draw(st.binary(max_size=4096))
    if kind == "magic+random":  # passes identification, then garbage
        return ext, good[: draw(st.integers(4, 32))] + draw(st.binary(max_size=4096))
    if kind == "truncate":
        return ext, good[: draw(st.integers(0, len(good) - 1))]
    data = bytearray(good)
    span = min(64, len(data)) if kind == "header" else len(data)
    edits = draw(st.lists(st.tuples(st.integers(0, span - 1), st.integers(0, 255)), max_size=8))
    for position, value in edits:
        data[position] = value
    return ext, bytes(data)


@FUZZ
@given(damaged_files())
def test_inspect_never_raises_and_decodable_means_decodable(case: tuple[str, bytes]) -> None:
    ext, data = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"image.{ext}"
        path.write_bytes(data)
        row = inspect_file(path, ValidationConfig().max_image_pixels)
        assert row["bytes"] == len(data)
        if not row["decodable"]:
            assert row["error"], "an undecodable file needs a reason"
            return
        assert row["error"] == ""
        # The scan's verdict holds for the decode that training, export and serving use.
        batch = decode_batch([path], PREP)
        assert batch.shape == (1, 3, 32, 32) and np.isfinite(batch).all()


@FUZZ
@given(damaged_files())
def test_scan_reports_each_damaged_file_with_a_reason(case: tuple[str, bytes]) -> None:
    ext, data = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for k, label in enumerate(("cat", "dog")):
            for i in range(2):
                write_photo(root / label / f"{i}.png", seed=10 * k + i, size=(24, 24))
        (root / "cat" / f"damaged.{ext}").write_bytes(data)
        result = scan_folder(root, DataConfig(), ValidationConfig(), seed=0)
        rows = result.manifest.set_index("relpath")
        assert len(rows) == 5 and rows.loc["cat/0.png", "decodable"]
        row = rows.loc[f"cat/damaged.{ext}"]
        assert row["label"] == "cat"
        assert row["decodable"] or row["error"]


def test_the_originals_are_valid_images() -> None:
    """The fuzz starts from real files: each one decodes in its own format."""
    for ext, data in originals().items():
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            assert img.size == (40, 30), ext
