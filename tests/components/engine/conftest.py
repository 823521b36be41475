import hashlib
from pathlib import Path

import pytest

from components.common.config import DataConfig, ValidationConfig
from components.data.scan import scan_dataset
from components.engine.backbones import load_backbone

ANTS_BEES = Path(__file__).parents[2] / "data" / "ants_bees"


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def images(digits_root: Path) -> tuple[list[str], list[str]]:
    """Ten digit scans: paths and sha256s."""
    m = scan_dataset(digits_root, DataConfig(), ValidationConfig(), 0).head(10)
    return m["path"].tolist(), m["sha256"].tolist()


@pytest.fixture(scope="module")
def photos() -> tuple[list[str], list[str]]:
    """Six real ants/bees photos: paths and sha256s."""
    paths = sorted(str(p) for p in ANTS_BEES.rglob("*.jpg"))[:6]
    return paths, [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]
