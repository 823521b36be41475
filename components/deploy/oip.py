"""The Open Inference Protocol (KServe/Triton/MLServer "v2") JSON shapes, without the web framework.

Requests are checked against the served model (input name, FP32, shape ``[N, 3, H, W]``) and
refused with a message saying what was expected; responses carry the logits as one FP32 tensor.
Tensor data may be flat or nested, in row-major order, as the protocol allows.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from components.common.config import ServeLimits
from components.deploy.classifier import OnnxClassifier
from components.deploy.limits import Refused, check_image_count

PLATFORM = "onnxruntime_onnx"
DATATYPE = "FP32"


def server_metadata(name: str, version: str) -> dict[str, Any]:
    """``GET /v2``: the server's name, version and protocol extensions (none)."""
    return {"name": name, "version": version, "extensions": []}


def model_metadata(model: OnnxClassifier) -> dict[str, Any]:
    """``GET /v2/models/{name}``: the version served, the platform and the tensors' shapes."""
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": PLATFORM,
        "inputs": [
            {"name": model.input_name, "datatype": DATATYPE, "shape": [-1, *model.input_shape]}
        ],
        "outputs": [
            {"name": model.output_name, "datatype": DATATYPE, "shape": [-1, len(model.labels)]}
        ],
        "parameters": {"labels": model.labels, "preprocessing": model.preprocessing.to_dict()},
    }


def parse_infer_request(
    request: Any, model: OnnxClassifier, limits: ServeLimits
) -> tuple[str | None, np.ndarray]:
    """The request's ``id`` and its input as a (N, 3, H, W) float32 array.

    Raises ``Refused`` (400, or 413 for more rows than ``limits.request_images``) naming the field.
    """
    if not isinstance(request, dict):
        raise Refused(400, "an inference request is a JSON object with an 'inputs' array")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise Refused(400, f"'id' must be a string, got {request_id!r}")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise Refused(400, f"'inputs' must hold exactly one tensor, named {model.input_name!r}")
    _check_outputs(request.get("outputs"), model)
    tensor = inputs[0]
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if name != model.input_name:
        raise Refused(400, f"unknown input {name!r}; this model's input is {model.input_name!r}")
    if datatype != DATATYPE:
        raise Refused(400, f"input datatype must be {DATATYPE}, got {datatype!r}")
    expected = [-1, *model.input_shape]
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or shape[0] < 1
        or list(shape[1:]) != expected[1:]
    ):
        raise Refused(400, f"input shape must be {expected} (N images), got {shape!r}")
    check_image_count(shape[0], limits)
    data = tensor.get("data")
    if not isinstance(data, list):
        raise Refused(400, "input 'data' must be an array of numbers (flat or nested)")
    try:
        array = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise Refused(
            400, f"input 'data' is not a (flat or nested) array of numbers: {err}"
        ) from None
    if array.size != math.prod(shape):
        raise Refused(
            400, f"input 'data' holds {array.size} numbers; shape {shape} needs {math.prod(shape)}"
        )
    if array.ndim not in (1, len(shape)) or (array.ndim > 1 and list(array.shape) != shape):
        raise Refused(400, f"nested input 'data' has shape {list(array.shape)}, not {shape}")
    if not np.isfinite(array).all():
        raise Refused(400, "input 'data' holds NaN or infinite values")
    return request_id, array.reshape(shape)


def _check_outputs(outputs: Any, model: OnnxClassifier) -> None:
    if outputs is None:
        return
    names = [o.get("name") for o in outputs] if isinstance(outputs, list) else None
    if names is None or any(n != model.output_name for n in names):
        raise Refused(
            400, f"requested outputs {names!r}; this model has one, {model.output_name!r}"
        )


def infer_response(
    model: OnnxClassifier, request_id: str | None, logits: np.ndarray
) -> dict[str, Any]:
    """The inference response: the logits as one FP32 tensor, flat in row-major order."""
    response: dict[str, Any] = {
        "model_name": model.name,
        "model_version": model.version,
        "outputs": [
            {
                "name": model.output_name,
                "shape": list(logits.shape),
                "datatype": DATATYPE,
                "data": logits.astype(np.float32).ravel().tolist(),
            }
        ],
    }
    if request_id is not None:
        response["id"] = request_id
    return response
