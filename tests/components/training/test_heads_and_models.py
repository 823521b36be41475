from pathlib import Path

import numpy as np
import pytest
import torch

from components.engine.backbones import load_backbone
from components.training.heads import fit_linear_head
from components.training.models import ModelSpec, build_model, load_model, save_model


def test_linear_head_learns_and_folds_standardisation() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)
    x = rng.normal(size=(200, 6)) * [1, 10, 100, 1, 1, 1] + 40
    x[:, 0] += 5 * y  # the only informative feature
    fit = fit_linear_head(x[::2], y[::2], x[1::2], y[1::2], 2, seed=0)
    raw_pred = fit.head(torch.from_numpy(x[1::2]).float()).argmax(1).numpy()
    assert fit.val_accuracy >= 0.9
    assert np.mean(raw_pred == y[1::2]) == pytest.approx(fit.val_accuracy)  # takes raw features
    # The penalty was chosen by CV on the training rows alone, over a grid walked strong to weak.
    assert fit.curve is not None and fit.cv_folds == 5 and fit.c in fit.curve.grid


@pytest.mark.parametrize("cut", ["block2", None])
def test_model_save_and_load_round_trip(tmp_path: Path, cut: str | None) -> None:
    backbone = load_backbone("efficientnet_lite0")
    spec = ModelSpec(backbone.name, 2 if cut else 3, cut, 3, "pretrained", 64)
    model = build_model(spec, backbone).eval()
    path = save_model(model, spec, ["a", "b", "c"], tmp_path / "m.pt")
    loaded, spec2, labels = load_model(path, backbone)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert spec2 == spec and labels == ["a", "b", "c"]
    if cut:
        assert not any(p.requires_grad for p in loaded.prefix.parameters())
