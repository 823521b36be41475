from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.images import Preprocessing, open_image, preprocess_file


@pytest.mark.parametrize(
    "mode", ["CMYK", "P", "RGBA", "L", "LA", "I;16", "1"], ids=lambda m: m.replace(";", "")
)
def test_any_mode_opens_as_rgb(tmp_path: Path, mode: str) -> None:
    ext = "tiff" if mode == "CMYK" else "png"
    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray((rng.random((20, 30)) * 60000).astype(np.uint16))
    else:
        img = Image.fromarray((rng.random((20, 30, 3)) * 255).astype(np.uint8)).convert(mode)
    img.save(tmp_path / f"x.{ext}")
    out = open_image(tmp_path / f"x.{ext}")
    assert out.mode == "RGB" and out.size == (30, 20)
    assert np.asarray(out).std() > 0  # content survived the conversion


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), "white")
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree turn
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = open_image(tmp_path / "rot.jpg")
    assert out.size == (20, 40)
    top = np.asarray(out)[:10].mean(axis=(0, 1))
    assert top[0] > 200 and top[1] < 80  # the red strip now runs along the top


def test_decompression_bomb_guard_stays_on(tmp_path: Path) -> None:
    Image.new("L", (200, 200)).save(tmp_path / "big.png")
    with pytest.raises(Image.DecompressionBombError):
        open_image(tmp_path / "big.png", max_pixels=1000)


def test_preprocess_file_shape_and_normalisation(tmp_path: Path) -> None:
    Image.new("RGB", (50, 80), (255, 255, 255)).save(tmp_path / "w.png")
    prep = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    arr = preprocess_file(tmp_path / "w.png", prep)
    assert arr.shape == (3, 32, 32) and arr.dtype == np.float32
    np.testing.assert_allclose(arr, 1.0, atol=1e-5)  # white -> (1 - 0.5) / 0.5
    assert Preprocessing.from_dict(prep.to_dict()) == prep
