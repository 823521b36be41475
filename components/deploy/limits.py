"""What one request may cost the server, enforced before the cost is paid.

Three bounds: the body (refused from ``Content-Length``, or as soon as a streamed body passes the
limit), each image's pixels and decoded bytes (from the header, through Pillow's lazy open, before
decoding), and the images per request. A semaphore in the app bounds how many decodes run at once,
so ``decodes_in_flight x decoded_bytes`` bounds the memory decoding can take.
"""

from __future__ import annotations

import io
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from components.common.config import ServeLimits
from components.engine.images import Preprocessing, eval_pixels, normalise, open_image

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Refused(Exception):
    """A request the server will not run, with the HTTP status and a message naming the limit."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def check_image_count(n: int, limits: ServeLimits) -> None:
    """Refuse a request with no images (400) or more than ``request_images`` (413)."""
    if n == 0:
        raise Refused(400, "no image in the request; send image bytes or multipart files")
    if n > limits.request_images:
        raise Refused(
            413, f"{n} images in one request; the limit is {limits.request_images} (serve.limits)"
        )


def decode_image(data: bytes, prep: Preprocessing, limits: ServeLimits, name: str) -> np.ndarray:
    """One image's bytes as the network's (1, 3, H, W) float32 input, exactly as in training.

    Raises ``Refused``: 413 when the header's size or decoded bytes pass the limits (nothing is
    decoded then), 400 when the bytes are not a decodable image.
    """
    try:
        img = open_image(
            io.BytesIO(data), limits.image_pixels, keep_grey=True, max_bytes=limits.decoded_bytes
        )
    except Image.DecompressionBombError as err:
        raise Refused(413, f"{name}: image too large: {err} (serve.limits)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        why = "unknown format" if isinstance(err, UnidentifiedImageError) else str(err)
        raise Refused(
            400,
            f"{name} is not a decodable image ({why}); "
            "send the bytes of a JPEG, PNG, WebP, BMP, GIF or TIFF file",
        ) from None
    return normalise(eval_pixels(img, prep)[None], prep)


def parse_json(body: bytes) -> Any:
    """The request body as JSON, or a 400 that says where it stopped parsing."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise Refused(400, f"the body is not valid JSON: {err}") from None


class BodyLimit:
    """ASGI middleware refusing bodies over ``max_bytes`` (413) before they are buffered.

    A declared ``Content-Length`` over the limit is refused on the first read, before any byte is
    taken in; a chunked body is counted as it arrives and cut off at the limit. Either way the
    route's read raises ``Refused``, so the 413 is answered (and counted) like any other refusal.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        seen = int(declared) if declared.isdigit() else 0

        async def counted() -> Message:
            nonlocal seen
            if seen > self.max_bytes:
                raise Refused(413, self._message(seen))
            message = await receive()
            if message["type"] == "http.request" and not declared.isdigit():
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise Refused(413, self._message(seen, at_least=True))
            return message

        await self.app(scope, counted, send)

    def _message(self, size: int, at_least: bool = False) -> str:
        return (
            f"body of {'at least ' if at_least else ''}{size} bytes exceeds the limit of "
            f"{self.max_bytes} (serve.limits.body_bytes)"
        )
