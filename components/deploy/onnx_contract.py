"""The ONNX file's contract: what a consumer needs to use the model, stored inside the model.

A ``.onnx`` file copied out of the registry (into Triton, onto a device, into another team's
service) loses the sidecar files; its ``metadata_props`` travel with it. Every key starts with
``transfer_pipeline.`` so ours never collide with a converter's or a runtime's; the keys are listed
in ``docs/deployment.md``. Values are strings; labels and preprocessing are JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import onnx

PREFIX = "transfer_pipeline."
FLOAT_NCHW = "float32 NCHW, resized, centre-cropped and normalised by the caller"
UINT8_NHWC = "uint8 NHWC RGB at image_size, resized and centre-cropped; normalised inside"


def pipeline_version() -> str:
    """The installed package's version, so a model says which code made it."""
    try:
        return package_metadata.version("transfer-pipeline")
    except package_metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class ModelContract:
    """Everything recorded in the file besides the graph (the opset is read from the graph)."""

    labels: tuple[str, ...]  # in output order
    preprocessing: dict[str, Any]  # Preprocessing.to_dict(): size, crop, mean, std, interpolation
    backbone: str
    backbone_weights_sha256: str
    case: int
    cut: str | None
    data_digest: str
    input_format: str = FLOAT_NCHW
    version: str = field(default_factory=pipeline_version)

    def props(self, opset: int) -> dict[str, str]:
        """The ``metadata_props`` entries, prefixed."""
        values = {
            "labels": json.dumps(list(self.labels)),
            "preprocessing": json.dumps(self.preprocessing, sort_keys=True),
            "input_format": self.input_format,
            "backbone": self.backbone,
            "backbone_weights_sha256": self.backbone_weights_sha256,
            "case": str(self.case),
            "cut": self.cut or "",
            "data_digest": self.data_digest,
            "pipeline_version": self.version,
            "opset": str(opset),
        }
        return {PREFIX + key: value for key, value in values.items()}


def graph_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset the graph was written for."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def stamp(path: Path, contract: ModelContract) -> None:
    """Write ``contract`` into ``path``'s ``metadata_props``, replacing any earlier entries of ours."""
    model = onnx.load(str(path))
    kept = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    for key, value in [*kept, *contract.props(graph_opset(model)).items()]:
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def read_props(path: Path) -> dict[str, str]:
    """Our ``metadata_props`` entries of ``path``, without the prefix (empty for a foreign file)."""
    model = onnx.load(str(path), load_external_data=False)
    return {
        p.key.removeprefix(PREFIX): p.value
        for p in model.metadata_props
        if p.key.startswith(PREFIX)
    }


def labels_and_preprocessing(path: Path) -> tuple[list[str], dict[str, Any]] | None:
    """The labels and preprocessing stored in ``path``, or None when it carries no contract."""
    props = read_props(path)
    if "labels" not in props or "preprocessing" not in props:
        return None
    return list(json.loads(props["labels"])), dict(json.loads(props["preprocessing"]))
