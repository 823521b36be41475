"""A registered ONNX model as a Triton Inference Server model repository.

Triton wants ``REPO/<name>/config.pbtxt``, ``REPO/<name>/<version>/model.onnx`` and, for
classification output, a labels file with one label per line in output order. The configuration is
read off the graph (input and output names, element types and shapes), so it cannot drift from the
file: the batch axis becomes ``max_batch_size`` (with dynamic batching), the other axes ``dims``.
The preprocessing a client must apply is recorded as config parameters (and is in the ONNX file's
``metadata_props``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import onnx

LABELS_FILE = "labels.txt"
MODEL_FILE = "model.onnx"
# ONNX TensorProto element types -> Triton's DataType names.
_TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}


def _tensor(value: onnx.ValueInfoProto, batched: bool) -> dict[str, Any]:
    dims = [
        d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim
    ]
    elem = value.type.tensor_type.elem_type
    if elem not in _TRITON_TYPES:
        raise ValueError(f"tensor {value.name!r} has an element type Triton cannot take: {elem}")
    return {
        "name": value.name,
        "data_type": _TRITON_TYPES[elem],
        "dims": dims[1:] if batched else dims,
    }


def _batched(model: onnx.ModelProto) -> bool:
    """Whether every input and output has a symbolic first (batch) axis."""
    values = [*model.graph.input, *model.graph.output]
    return all(
        v.type.tensor_type.shape.dim and not v.type.tensor_type.shape.dim[0].HasField("dim_value")
        for v in values
    )


def _text(value: str) -> str:
    # A JSON string literal is a valid protobuf text-format string when kept as UTF-8.
    return json.dumps(value, ensure_ascii=False)


def triton_config(
    onnx_path: Path,
    name: str,
    max_batch_size: int,
    preprocessing: dict[str, Any] | None = None,
) -> str:
    """``config.pbtxt`` (protobuf text format of Triton's ``ModelConfig``) for ``onnx_path``.

    The first output carries ``label_filename``: Triton's classification extension returns label
    names from it. ``max_batch_size`` is 0 (no batching) when the graph has a fixed batch axis.
    """
    model = onnx.load(str(onnx_path), load_external_data=False)
    batched = _batched(model)
    lines = [
        f"name: {_text(name)}",
        'platform: "onnxruntime_onnx"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size if batched else 0}",
    ]
    for section, values in (("input", model.graph.input), ("output", model.graph.output)):
        for i, value in enumerate(values):
            t = _tensor(value, batched)
            lines += [
                f"{section} {{",
                f"  name: {_text(t['name'])}",
                f"  data_type: {t['data_type']}",
                f"  dims: [ {', '.join(str(d) for d in t['dims'])} ]",
            ]
            if section == "output" and i == 0:
                lines.append(f"  label_filename: {_text(LABELS_FILE)}")
            lines.append("}")
    if batched:
        lines.append("dynamic_batching { }")
    for key, value in sorted((preprocessing or {}).items()):
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        lines.append(
            f"parameters {{ key: {_text('preprocessing.' + key)} "
            f"value {{ string_value: {_text(text)} }} }}"
        )
    return "\n".join(lines) + "\n"


def write_repository(
    onnx_path: Path,
    labels: list[str],
    name: str,
    version: int,
    repo: Path,
    max_batch_size: int = 32,
    preprocessing: dict[str, Any] | None = None,
) -> Path:
    """Write (or update) ``repo/name`` for one version; returns the model's folder.

    Other versions already in the folder are left as they are (Triton serves the latest by default).
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    model_dir = Path(repo) / name
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, model_dir / str(version) / MODEL_FILE)
    (model_dir / LABELS_FILE).write_text("".join(f"{label}\n" for label in labels))
    (model_dir / "config.pbtxt").write_text(
        triton_config(onnx_path, name, max_batch_size, preprocessing)
    )
    return model_dir
