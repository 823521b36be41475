"""A small JSON-over-HTTP classifier around an exported ONNX model.

Images go through ``components.images`` exactly as in training and evaluation (EXIF orientation,
RGB conversion, resize, centre crop, normalisation), so the served model sees the same pixels.
Only the standard library's threading HTTP server is used: enough for a demo, a smoke test or a
sidecar, with ONNX Runtime's thread-safe ``run`` doing the work.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from components.deploy.export import INPUT_NAME, OUTPUT_NAME, onnx_session
from components.engine.images import Preprocessing, eval_pixels, normalise, open_image, to_rgb

logger = logging.getLogger(__name__)

# Larger request bodies are refused before being read (413).
MAX_BODY_BYTES = 32 * 1024 * 1024

ImageInput = Image.Image | Path | bytes


class OnnxClassifier:
    """Labels and class probabilities for images, from an ONNX model and its preprocessing."""

    def __init__(
        self,
        onnx_path: Path,
        labels: Sequence[str],
        preprocessing: Preprocessing,
        max_pixels: int | None = None,
    ) -> None:
        self.labels = list(labels)
        self.preprocessing = preprocessing
        self.max_pixels = max_pixels
        self._session = onnx_session(Path(onnx_path))
        classes = self._session.get_outputs()[0].shape[-1]
        if isinstance(classes, int) and classes != len(self.labels):
            raise ValueError(
                f"{onnx_path} outputs {classes} classes but {len(self.labels)} labels were given"
            )

    @classmethod
    def from_registry(cls, model_uri: str, tracking_uri: str) -> OnnxClassifier:
        """Load a registered version (e.g. ``models:/flowers@candidate``) with its labels."""
        from components.deploy.tracking import load_registered

        onnx_path, labels, prep = load_registered(model_uri, tracking_uri)
        return cls(onnx_path, labels, Preprocessing.from_dict(prep))

    def _load(self, image: ImageInput) -> Image.Image:
        if isinstance(image, Image.Image):
            return to_rgb(ImageOps.exif_transpose(image))
        if isinstance(image, bytes | bytearray):
            return open_image(io.BytesIO(image), self.max_pixels)  # type: ignore[arg-type]
        return open_image(image, self.max_pixels)

    def predict(self, images: Sequence[ImageInput]) -> list[dict[str, Any]]:
        """One ``{"label", "score", "probabilities": {label: p}}`` per image, in input order.

        Undecodable input raises ``PIL.UnidentifiedImageError``; a decompression bomb raises
        ``PIL.Image.DecompressionBombError``.
        """
        if not images:
            return []
        prep = self.preprocessing
        batch = normalise(np.stack([eval_pixels(self._load(img), prep) for img in images]), prep)
        logits = self._session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0].astype(np.float64)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        results = []
        for row in probs:
            best = int(row.argmax())
            results.append(
                {
                    "label": self.labels[best],
                    "score": float(row[best]),
                    "probabilities": {
                        lab: float(p) for lab, p in zip(self.labels, row, strict=True)
                    },
                }
            )
        return results


class _Handler(BaseHTTPRequestHandler):
    server: _ClassifierServer
    protocol_version = "HTTP/1.1"

    def _reply(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._reply(status, {"error": message})

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == "/health":
            self._reply(HTTPStatus.OK, {"status": "ok", "labels": self.server.classifier.labels})
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no route GET {self.path}; try GET /health")

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != "/predict":
            self._error(HTTPStatus.NOT_FOUND, f"no route POST {self.path}; try POST /predict")
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self._error(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
            return
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            self._error(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body of {length} bytes exceeds the limit of {MAX_BODY_BYTES}",
            )
            return
        body = self.rfile.read(int(length))
        if not body:
            self._error(HTTPStatus.BAD_REQUEST, "empty body; send the raw bytes of one image")
            return
        try:
            result = self.server.classifier.predict([body])[0]
        except Image.DecompressionBombError as err:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"image too large: {err}")
        except (UnidentifiedImageError, OSError, ValueError) as err:
            self._error(
                HTTPStatus.BAD_REQUEST,
                f"body is not a decodable image ({type(err).__name__}: {err}); "
                "send the raw bytes of one JPEG, PNG, WebP, BMP, GIF or TIFF file",
            )
        except Exception:
            logger.exception("prediction failed")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "prediction failed; see the server log")
        else:
            self._reply(HTTPStatus.OK, result)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - " + format, self.address_string(), *args)


class _ClassifierServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], classifier: OnnxClassifier) -> None:
        self.classifier = classifier
        super().__init__(address, _Handler)


def make_server(
    classifier: OnnxClassifier, host: str = "127.0.0.1", port: int = 0
) -> ThreadingHTTPServer:
    """A bound, not yet serving, server: GET /health and POST /predict (raw image bytes).

    ``port=0`` picks a free port; read it back from ``server.server_address``.
    """
    return _ClassifierServer((host, port), classifier)


def serve_forever(classifier: OnnxClassifier, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (Ctrl-C), then close the socket."""
    server = make_server(classifier, host, port)
    bound_host, bound_port = server.server_address[:2]
    logger.info("serving %d labels on http://%s:%d", len(classifier.labels), bound_host, bound_port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("interrupted; shutting down")
    finally:
        server.server_close()
