"""The digits, embedded once per module, for the training tests."""

from pathlib import Path

import pytest

from components.common.config import DataConfig, ValidationConfig
from components.data.scan import scan_dataset
from components.data.splits import load_splits
from components.engine.backbones import load_backbone
from components.engine.extraction import ExtractionEngine
from components.engine.images import Preprocessing


@pytest.fixture(scope="module")
def setup(digits_root: Path, tmp_path_factory: pytest.TempPathFactory):
    manifest = scan_dataset(digits_root, DataConfig(), ValidationConfig(), 0)
    backbone = load_backbone("efficientnet_lite0")
    prep = Preprocessing(64, (0.5,) * 3, (0.5,) * 3)
    classes = [str(d) for d in range(10)]
    cache = tmp_path_factory.mktemp("cache")
    return (
        manifest,
        backbone,
        prep,
        classes,
        load_splits(manifest, classes, ExtractionEngine(backbone, cache, num_workers=0), prep),
    )
