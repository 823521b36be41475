"""The model server on a real uvicorn socket: OIP v2 shapes, image requests, limits, concurrency."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from components.common.config import ExportConfig, ServeConfig, ServeLimits
from components.deploy.classifier import OnnxClassifier
from components.deploy.export import export_onnx
from components.deploy.reload import ModelHolder
from components.deploy.server import BackgroundServer
from components.deploy.serving_app import create_app
from components.engine.images import Preprocessing, preprocess_file
from tests.conftest import bomb_png, png_bytes, tiny_classifier

LABELS = ["circle", "square", "stripe"]
PREP = Preprocessing(image_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
LIMITS = ServeLimits(
    body_bytes=2_000_000,
    image_pixels=100_000_000,  # the bomb below is inside it: the decoded-bytes limit must catch it
    decoded_bytes=8_000_000,
    request_images=4,
)


@pytest.fixture(scope="module")
def model_and_classifier(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[nn.Module, OnnxClassifier]:
    model = tiny_classifier(len(LABELS))
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = export_onnx(model, torch.randn(4, 3, 32, 32), out, ExportConfig())
    return model, OnnxClassifier(result.onnx_path, LABELS, PREP, name="shapes", version="3")


@pytest.fixture(scope="module")
def server(model_and_classifier: tuple[nn.Module, OnnxClassifier]) -> Iterator[BackgroundServer]:
    cfg = ServeConfig(max_batch=8, max_wait_ms=2, limits=LIMITS, decode_threads=2)
    with BackgroundServer(create_app(ModelHolder(model_and_classifier[1]), cfg)) as srv:
        yield srv


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _tensor(x: np.ndarray, nested: bool = False) -> dict[str, Any]:
    data = x.tolist() if nested else x.ravel().tolist()
    return {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": data}


def _error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    return body["error"]


def test_health_and_server_metadata_have_the_protocol_shapes(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get("/v2").json()
    assert set(meta) == {"name", "version", "extensions"}
    assert meta["name"] == "transfer-pipeline" and isinstance(meta["extensions"], list)


@pytest.mark.parametrize("prefix", ["/v2/models/shapes", "/v2/models/shapes/versions/3"])
def test_model_metadata_and_readiness(client: httpx.Client, prefix: str) -> None:
    meta = client.get(prefix).json()
    assert {"name", "versions", "platform", "inputs", "outputs"} <= set(meta)
    assert (meta["name"], meta["versions"], meta["platform"]) == (
        "shapes",
        ["3"],
        "onnxruntime_onnx",
    )
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]
    assert meta["parameters"]["labels"] == LABELS
    assert client.get(f"{prefix}/ready").json() == {"name": "shapes", "ready": True}


@pytest.mark.parametrize("nested", [False, True])
def test_infer_returns_the_models_logits(
    client: httpx.Client, model_and_classifier: tuple[nn.Module, OnnxClassifier], nested: bool
) -> None:
    model, _ = model_and_classifier
    x = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    request = {"id": "req-7", "inputs": [_tensor(x, nested)], "outputs": [{"name": "logits"}]}
    response = client.post("/v2/models/shapes/versions/3/infer", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"model_name", "model_version", "id", "outputs"}
    assert (body["model_name"], body["model_version"], body["id"]) == ("shapes", "3", "req-7")
    (out,) = body["outputs"]
    assert set(out) == {"name", "shape", "datatype", "data"}
    assert (out["name"], out["shape"], out["datatype"]) == ("logits", [2, 3], "FP32")
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.array(out["data"]).reshape(2, 3), expected, atol=1e-4)


def test_infer_without_an_id_answers_without_one(client: httpx.Client) -> None:
    x = np.zeros((1, 3, 32, 32), np.float32)
    body = client.post("/v2/models/shapes/infer", json={"inputs": [_tensor(x)]}).json()
    assert "id" not in body and body["outputs"][0]["shape"] == [1, 3]


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"datatype": "INT64"}, "datatype must be FP32"),
        ({"name": "pixels"}, "unknown input 'pixels'"),
        ({"shape": [1, 3, 16, 16]}, "shape must be [-1, 3, 32, 32]"),
        ({"shape": [2, 3, 32, 32]}, "holds 3072 numbers; shape [2, 3, 32, 32] needs 6144"),
        ({"data": "zeros"}, "must be an array"),
        ({"data": [[1.0, 2.0], [3.0]]}, "not a (flat or nested) array"),
    ],
)
def test_bad_tensors_are_refused_with_400(
    client: httpx.Client, change: dict[str, Any], fragment: str
) -> None:
    tensor = {**_tensor(np.zeros((1, 3, 32, 32), np.float32)), **change}
    response = client.post("/v2/models/shapes/infer", json={"inputs": [tensor]})
    assert fragment in _error(response, 400)


def test_unknown_models_versions_and_routes_are_404_and_bad_json_400(client: httpx.Client) -> None:
    x = {"inputs": [_tensor(np.zeros((1, 3, 32, 32), np.float32))]}
    assert "unknown model 'other'" in _error(client.post("/v2/models/other/infer", json=x), 404)
    wrong = client.post("/v2/models/shapes/versions/9/infer", json=x)
    assert "version 9 is not served; version 3 is" in _error(wrong, 404)
    assert "no route GET /nope" in _error(client.get("/nope"), 404)
    bad = client.post("/v2/models/shapes/infer", content=b"{not json")
    assert "not valid JSON" in _error(bad, 400)
    too_many = {"inputs": [_tensor(np.zeros((5, 3, 32, 32), np.float32))]}
    assert "5 images in one request; the limit is 4" in _error(
        client.post("/v2/models/shapes/infer", json=too_many), 413
    )


def test_classify_raw_body_matches_training_preprocessing(
    client: httpx.Client, model_and_classifier: tuple[nn.Module, OnnxClassifier], tmp_path: Path
) -> None:
    model, _ = model_and_classifier
    data = png_bytes((48, 40), seed=3, mode="RGBA")
    (tmp_path / "x.png").write_bytes(data)
    response = client.post("/v1/classify", content=data, headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model_name"], body["model_version"]) == ("shapes", "3")
    (pred,) = body["predictions"]
    assert pred["label"] in LABELS and pred["score"] == max(pred["probabilities"].values())
    x = torch.from_numpy(preprocess_file(tmp_path / "x.png", PREP))[None]
    with torch.inference_mode():
        expected = torch.softmax(model(x), dim=1)[0].numpy()
    got = np.array([pred["probabilities"][lab] for lab in LABELS])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_classify_multipart_batch_keeps_order_and_names(
    client: httpx.Client, model_and_classifier: tuple[nn.Module, OnnxClassifier]
) -> None:
    _, classifier = model_and_classifier
    images = [png_bytes((40 + 8 * i, 36), seed=i, mode=m) for i, m in enumerate(["RGB", "L", "P"])]
    files = [("files", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = client.post("/v1/classify", files=files)
    assert response.status_code == 200, response.text
    preds = response.json()["predictions"]
    assert [p["file"] for p in preds] == ["img0.png", "img1.png", "img2.png"]
    direct = classifier.predict(images)
    for got, want in zip(preds, direct, strict=True):
        assert got["label"] == want["label"]
        assert got["score"] == pytest.approx(want["score"], abs=1e-6)


def test_bad_and_over_limit_images_are_refused_with_clear_messages(client: httpx.Client) -> None:
    assert "not a decodable image" in _error(client.post("/v1/classify", content=b"GIF89a?"), 400)
    assert "no image in the request" in _error(client.post("/v1/classify", content=b""), 400)
    bomb = bomb_png()
    assert len(bomb) < 20_000
    message = _error(client.post("/v1/classify", content=bomb), 413)
    assert "9000x9000 image (mode 1) would take 324000000 bytes decoded" in message
    assert "over the limit of 8000000" in message
    five = [("f", (f"{i}.png", png_bytes(seed=i))) for i in range(5)]
    assert "more than 4 images in one request; the limit is 4" in _error(
        client.post("/v1/classify", files=five), 413
    )
    # The server is unharmed: the next good request is answered.
    assert client.post("/v1/classify", content=png_bytes()).status_code == 200


def test_bodies_over_the_limit_are_refused_whether_declared_or_streamed(
    client: httpx.Client,
) -> None:
    big = b"\0" * (LIMITS.body_bytes + 1)
    assert "exceeds the limit of 2000000" in _error(client.post("/v1/classify", content=big), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        for _ in range(40):
            yield b"\0" * 100_000

    streamed = client.post("/v1/classify", content=chunks())
    assert "body of at least" in _error(streamed, 413)


def test_fifty_concurrent_clients_all_get_answers(server: BackgroundServer) -> None:
    images = [png_bytes((64, 48), seed=i) for i in range(50)]

    async def one(client: httpx.AsyncClient, data: bytes) -> int:
        return (await client.post("/v1/classify", content=data)).status_code

    async def run() -> list[int | BaseException]:
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(one(client, d) for d in images), return_exceptions=True)

    results = asyncio.run(run())
    assert results == [200] * 50


def test_metrics_count_requests_batches_and_the_version(client: httpx.Client) -> None:
    client.post("/v1/classify", content=png_bytes())
    client.get("/nope")
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    requests = {
        (s.labels["endpoint"], s.labels["status"]): s.value
        for s in families["serve_requests"].samples
        if s.name == "serve_requests_total"
    }
    assert requests[("/v1/classify", "200")] >= 1
    assert requests[("unmatched", "404")] >= 1
    assert any(s.name.endswith("_count") for s in families["serve_request_latency_seconds"].samples)
    batches = {s.name: s.value for s in families["serve_batch_size"].samples}
    assert batches["serve_batch_size_count"] >= 1
    (info,) = families["serve_model_info"].samples
    assert (info.labels, info.value) == ({"name": "shapes", "version": "3"}, 1.0)


def test_classifier_predicts_paths_images_and_bytes_alike(
    model_and_classifier: tuple[nn.Module, OnnxClassifier], tmp_path: Path
) -> None:
    _, classifier = model_and_classifier
    data = png_bytes(seed=5)
    (tmp_path / "x.png").write_bytes(data)
    from_path, from_bytes, from_image = classifier.predict(
        [tmp_path / "x.png", data, Image.open(io.BytesIO(data))]
    )
    assert from_path == from_bytes
    assert from_image["label"] == from_path["label"]
    assert classifier.predict([]) == []
