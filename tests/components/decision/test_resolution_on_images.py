"""The resolution measured on real images: where the classes live in fine detail the native size
wins by a margin that frame-filling copies of the same classes do not show.

Both folders are made from scikit-learn's digit scans, written as PNG files and decoded by
Pillow through the pipeline's own extraction engine (ONNX Runtime on CPU) and probe.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from components.common.config import PipelineConfig
from components.decision.resolution import candidate_sizes, measure_sizes
from components.engine.backbones import load_backbone
from components.engine.extraction import ExtractionEngine
from components.training.cases import choose_image_size

SIDE = 32  # the images' size: the rule feeds them at 64 px, the backbone's native size is 224
CLASSES = (3, 5, 8, 9)


def _write(root: Path, glyph: int, per_class: int) -> tuple[list[str], list[str], np.ndarray]:
    """``per_class`` images of each digit: a ``glyph``-pixel scan at a random place on a faintly
    noisy ``SIDE``-pixel background."""
    digits, rng = load_digits(), np.random.default_rng(0)
    paths, labels = [], []
    for digit in CLASSES:
        (root / str(digit)).mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(digits.target == digit)[:per_class]):
            canvas = rng.integers(120, 136, size=(SIDE, SIDE)).astype(np.float64)
            scan = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8))
            scan = np.asarray(scan.resize((glyph, glyph), Image.Resampling.BILINEAR), float)
            x, y = rng.integers(0, SIDE - glyph + 1, size=2)
            canvas[y : y + glyph, x : x + glyph] = np.maximum(
                canvas[y : y + glyph, x : x + glyph], scan
            )
            path = root / str(digit) / f"{k:03d}.png"
            Image.fromarray(canvas.astype(np.uint8)).save(path)
            paths.append(str(path))
            labels.append(digit)
    shas = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]
    return paths, shas, np.unique(labels, return_inverse=True)[1]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> ExtractionEngine:
    cfg = PipelineConfig()
    backbone = load_backbone(cfg.backbone, cfg.backbone_weights)
    return ExtractionEngine.for_training(backbone, tmp_path_factory.mktemp("cache"), cfg.train)


def _choose(root: Path, glyph: int, engine: ExtractionEngine):
    paths, shas, labels = _write(root, glyph, per_class=40)
    rule, _ = choose_image_size("auto", SIDE, engine.native.image_size)
    sizes = candidate_sizes(rule, engine.native.image_size)
    assert sizes == (64, 224)
    return measure_sizes(paths, shas, labels, sizes, engine.native, engine, seed=0)


def test_tiny_digits_are_read_at_the_native_size(tmp_path: Path, engine: ExtractionEngine) -> None:
    tiny = _choose(tmp_path / "tiny", glyph=12, engine=engine)
    assert tiny.chosen == 224 and tiny.method == "probe", tiny.reason
    assert "scored best" in tiny.reason
    assert all(c.seconds is not None and c.seconds >= 0 for c in tiny.candidates)
    # The same digits filling the frame: both sizes read them, and the gap that the tiny ones
    # open is their fine detail, blurred away at 64 px, not a general 224-px advantage.
    large = _choose(tmp_path / "large", glyph=SIDE, engine=engine)
    gap = {
        name: choice.candidates[1].probe_accuracy - choice.candidates[0].probe_accuracy
        for name, choice in (("tiny", tiny), ("large", large))
    }
    assert min(c.probe_accuracy for c in large.candidates) > 0.9, large.reason
    assert gap["tiny"] > 0.05 and gap["tiny"] > 2 * gap["large"], gap
