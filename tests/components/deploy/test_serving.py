"""The HTTP classifier, served on a free local port and called over real sockets."""

from __future__ import annotations

import io
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from components.common.config import ExportConfig
from components.deploy.export import export_onnx
from components.deploy.serving import OnnxClassifier, make_server
from components.engine.images import Preprocessing, preprocess_file
from tests.conftest import tiny_classifier

LABELS = ["circle", "square", "stripe"]
PREP = Preprocessing(image_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _png(path: Path | None = None, size: tuple[int, int] = (48, 40)) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    if path is not None:
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_and_classifier(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[nn.Module, OnnxClassifier]:
    model = tiny_classifier(len(LABELS))
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = export_onnx(model, torch.randn(4, 3, 32, 32), out, ExportConfig())
    return model, OnnxClassifier(result.onnx_path, LABELS, PREP)


@pytest.fixture(scope="module")
def server(
    model_and_classifier: tuple[nn.Module, OnnxClassifier],
) -> Iterator[ThreadingHTTPServer]:
    srv = make_server(model_and_classifier[1], host="127.0.0.1", port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)
    assert not thread.is_alive()


def _call(
    srv: ThreadingHTTPServer, method: str, route: str, body: bytes | None = None
) -> tuple[int, dict[str, Any]]:
    host, port = srv.server_address[:2]
    request = urllib.request.Request(f"http://{host}:{port}{route}", data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_health_lists_labels(server: ThreadingHTTPServer) -> None:
    assert _call(server, "GET", "/health") == (200, {"status": "ok", "labels": LABELS})


def test_predict_png_matches_training_preprocessing(
    server: ThreadingHTTPServer,
    model_and_classifier: tuple[nn.Module, OnnxClassifier],
    tmp_path: Path,
) -> None:
    model, _ = model_and_classifier
    status, body = _call(server, "POST", "/predict", _png(tmp_path / "x.png"))
    assert status == 200
    assert body["label"] in LABELS
    assert set(body["probabilities"]) == set(LABELS)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    assert body["score"] == max(body["probabilities"].values())

    # Same pixels as training/evaluation: the PyTorch model on preprocess_file agrees.
    x = torch.from_numpy(preprocess_file(tmp_path / "x.png", PREP))[None]
    with torch.inference_mode():
        expected = torch.softmax(model(x), dim=1)[0].numpy()
    got = np.array([body["probabilities"][lab] for lab in LABELS])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_predict_accepts_paths_images_and_bytes(
    model_and_classifier: tuple[nn.Module, OnnxClassifier], tmp_path: Path
) -> None:
    _, classifier = model_and_classifier
    data = _png(tmp_path / "x.png")
    from_path, from_bytes, from_image = classifier.predict(
        [tmp_path / "x.png", data, Image.open(io.BytesIO(data))]
    )
    assert from_path == from_bytes
    assert from_image["label"] == from_path["label"]
    assert classifier.predict([]) == []


@pytest.mark.parametrize(
    ("route", "body", "status", "fragment"),
    [
        ("/predict", b"definitely not an image", 400, "not a decodable image"),
        ("/predict", b"", 400, "empty body"),
        ("/nope", b"x", 404, "POST /predict"),
    ],
)
def test_bad_requests_get_json_errors(
    server: ThreadingHTTPServer, route: str, body: bytes, status: int, fragment: str
) -> None:
    got_status, got = _call(server, "POST", route, body)
    assert got_status == status
    assert fragment in got["error"]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_over_the_pixel_limit_is_refused_with_413(
    server: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # _png() has 1,920: Pillow only warns
    status, body = _call(server, "POST", "/predict", _png())
    assert status == 413 and "1920 pixels exceeds the limit of 1000" in body["error"]


def test_server_keeps_serving_after_errors(server: ThreadingHTTPServer) -> None:
    assert _call(server, "POST", "/predict", b"\x89PNG broken")[0] == 400
    assert _call(server, "POST", "/predict", _png())[0] == 200
