"""A contact sheet of image pairs: the evidence a person needs to agree a pair is one image.

Numbers (a cosine, a hash distance) do not convince anyone that two files are copies; the two
thumbnails side by side do, in a second, so the validation report links one PNG of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from components.engine.images import open_image

THUMB = 128
CAPTION = 28
PAIRS_PER_ROW = 2
_GAP = 8


def _thumb(path: str, max_pixels: int | None) -> Image.Image:
    try:
        img = open_image(path, max_pixels)
    except Exception:  # a sheet is evidence, not a check: a file gone since the scan shows grey
        return Image.new("RGB", (THUMB, THUMB), (160, 160, 160))
    img.thumbnail((THUMB, THUMB))
    return img


def write_contact_sheet(
    pairs: Sequence[tuple[str, str, str]], path: Path, max_pixels: int | None = None
) -> Path:
    """Draw ``pairs`` of (first image, second image, caption) two pairs to a row into ``path``."""
    rows = max(1, -(-len(pairs) // PAIRS_PER_ROW))
    cell_w, cell_h = 2 * THUMB + _GAP, THUMB + CAPTION
    sheet = Image.new(
        "RGB",
        (PAIRS_PER_ROW * (cell_w + 2 * _GAP), rows * (cell_h + _GAP) + _GAP),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(sheet)
    for n, (first, second, caption) in enumerate(pairs):
        x = (n % PAIRS_PER_ROW) * (cell_w + 2 * _GAP) + _GAP
        y = (n // PAIRS_PER_ROW) * (cell_h + _GAP) + _GAP
        for k, image in enumerate((first, second)):
            thumb = _thumb(image, max_pixels)
            sheet.paste(thumb, (x + k * (THUMB + _GAP), y + (THUMB - thumb.height) // 2))
        for line, text in enumerate(caption.splitlines()[:2]):
            draw.text((x, y + THUMB + 2 + 12 * line), text[:44], fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
