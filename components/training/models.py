"""The trained model's recipe (``ModelSpec``), how to build it and how to save and reload it.

A model is saved as its spec plus its state dict, never as a pickled module, so a saved model can be
rebuilt by this code alone and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from components.engine.backbones import Backbone, fresh_model


@dataclass(frozen=True)
class ModelSpec:
    """Enough to rebuild the trained network from its backbone."""

    backbone: str
    case: int
    cut: str | None  # frozen cases: the last backbone layer kept ("head" = all of it)
    num_classes: int
    init: str  # "pretrained" | "random"
    image_size: int


class FrozenTransferModel(nn.Module):
    """A (possibly cut) frozen backbone, global average pooling and a new linear classifier."""

    def __init__(self, prefix: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.prefix = prefix
        self.head = head
        for p in self.prefix.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.prefix(x).mean(dim=(2, 3)))


def build_model(spec: ModelSpec, backbone: Backbone) -> nn.Module:
    """An untrained network of the right shape for ``spec`` (weights are loaded afterwards)."""
    if spec.cut is not None:
        prefix = copy.deepcopy(backbone.prefix(spec.cut))
        return FrozenTransferModel(prefix, nn.Linear(backbone.channels(spec.cut), spec.num_classes))
    return fresh_model(backbone, spec.num_classes, copy_backbone=spec.init == "pretrained")


def save_model(model: nn.Module, spec: ModelSpec, labels: list[str], path: Path) -> Path:
    """Write spec, labels and weights to one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"spec": json.dumps(asdict(spec)), "labels": labels, "state_dict": state}, path)
    return path


def load_model(path: Path, backbone: Backbone) -> tuple[nn.Module, ModelSpec, list[str]]:
    """Rebuild a model saved by ``save_model``, in eval mode on the CPU."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    spec = ModelSpec(**json.loads(saved["spec"]))
    model = build_model(spec, backbone)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), spec, list(saved["labels"])
