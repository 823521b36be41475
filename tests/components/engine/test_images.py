import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from components.engine.images import (
    EvalTransform,
    Preprocessing,
    decode_batch,
    decoded_bytes,
    open_image,
    preprocess_file,
)


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


def test_what_pillow_only_warns_about_is_refused_without_touching_warning_filters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.new("L", (40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,600 pixels: Pillow itself only warns
    filters = list(warnings.filters)
    with (
        pytest.warns(Image.DecompressionBombWarning),
        pytest.raises(Image.DecompressionBombError, match="40x40 = 1600 pixels"),
    ):
        open_image(tmp_path / "big.png")
    assert warnings.filters == filters  # process-wide state, shared by decoding threads
    with pytest.warns(Image.DecompressionBombWarning):  # a higher limit of one's own is honoured
        assert open_image(tmp_path / "big.png", max_pixels=2000).size == (40, 40)


@pytest.mark.parametrize(
    ("mode", "keep_grey", "per_pixel"),
    [
        ("RGB", False, 3),  # decoded as is, no conversion
        ("L", True, 1),  # kept grey
        ("L", False, 1 + 3),  # plus its RGB copy
        ("1", False, 1 + 3),
        ("RGBA", False, 4 + 15),  # compositing on white takes three RGBA images, then RGB
        ("I;16", False, 2 + 12),  # scaled through float64 to 8 bits, then RGB
    ],
)
def test_decoded_bytes_are_read_from_the_header(
    tmp_path: Path, mode: str, keep_grey: bool, per_pixel: int
) -> None:
    path = tmp_path / "x.png"
    Image.new(mode, (30, 20)).save(path)
    with Image.open(path) as img:
        assert img.mode == mode
        assert decoded_bytes(img, keep_grey) == 30 * 20 * per_pixel


def test_an_image_over_the_decoded_bytes_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    Image.new("1", (400, 300)).save(tmp_path / "bits.png")  # tiny file, 480 KB once made RGB
    with pytest.raises(Image.DecompressionBombError, match=r"400x300 image \(mode 1\) would take"):
        open_image(tmp_path / "bits.png", max_bytes=400 * 300 * 3)
    assert open_image(tmp_path / "bits.png", max_bytes=400 * 300 * 4).mode == "RGB"


def test_preprocess_file_shape_and_normalisation(tmp_path: Path) -> None:
    Image.new("RGB", (50, 80), (255, 255, 255)).save(tmp_path / "w.png")
    prep = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    arr = preprocess_file(tmp_path / "w.png", prep)
    assert arr.shape == (3, 32, 32) and arr.dtype == np.float32
    np.testing.assert_allclose(arr, 1.0, atol=1e-5)  # white -> (1 - 0.5) / 0.5
    assert Preprocessing.from_dict(prep.to_dict()) == prep


def _torchvision_reference(prep: Preprocessing) -> T.Compose:
    """The textbook torchvision pipeline that ``EvalTransform`` must reproduce."""
    return T.Compose(
        [
            T.Resize(prep.resize_size, T.InterpolationMode(prep.interpolation), antialias=True),
            T.CenterCrop(prep.image_size),
            T.PILToTensor(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(prep.mean, prep.std),
        ]
    )


@pytest.mark.parametrize(
    ("size", "crop_pct", "interpolation"),
    [(64, 0.875, "bicubic"), (33, 0.9, "bilinear"), (40, 1.15, "bicubic"), (41, 1.2, "nearest")],
)
@pytest.mark.parametrize("shape", [(97, 61), (61, 97), (50, 50), (13, 300)])
def test_eval_pixels_match_torchvision_resize_and_centre_crop(
    size: int, crop_pct: float, interpolation: str, shape: tuple[int, int]
) -> None:
    rng = np.random.default_rng(sum(shape))
    img = Image.fromarray(rng.integers(0, 256, (shape[1], shape[0], 3), dtype=np.uint8))
    prep = Preprocessing(
        size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), crop_pct, interpolation
    )
    expected = _torchvision_reference(prep)(img)
    got = EvalTransform(prep)(img)
    assert got.shape == expected.shape == (3, size, size) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_decode_batch_is_the_per_image_transform_stacked(tmp_path: Path) -> None:
    prep = Preprocessing(24, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4))
    paths = []
    for i, mode in enumerate(("RGB", "L", "P", "RGBA")):  # greyscale is resized as one channel
        rgb = np.random.default_rng(i).integers(0, 256, (30 + i, 40, 3), np.uint8)
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rgb).convert(mode).save(paths[-1])
    batch = decode_batch(paths, prep)
    assert batch.shape == (4, 3, 24, 24) and batch.flags["C_CONTIGUOUS"]
    for row, p in zip(batch, paths, strict=True):
        np.testing.assert_array_equal(row, EvalTransform(prep)(open_image(p)).numpy())
    grey = batch[1]
    np.testing.assert_allclose(grey[0] * 0.2 + 0.5, grey[1] * 0.3 + 0.4, atol=1e-6)  # one grey
