"""Running the app under uvicorn: in the foreground (the CLI) or on a background thread.

uvicorn listens with a backlog of 2048 (the standard library's server had 5, which is where 1-17 of
50 concurrent connections were reset), keeps connections alive, and on Ctrl-C stops accepting,
lets in-flight requests finish and then shuts the app down.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType

import uvicorn
from fastapi import FastAPI

BACKLOG = 2048


def _config(app: FastAPI, host: str, port: int, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        backlog=BACKLOG,
        lifespan="on",
        access_log=False,
        log_level=log_level,
        timeout_graceful_shutdown=30,
    )


def serve(app: FastAPI, host: str, port: int) -> None:
    """Serve until interrupted (Ctrl-C: a graceful stop, then a normal return)."""
    # uvicorn re-raises Ctrl-C once its graceful shutdown is done: that is the normal end here.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(_config(app, host, port, "info")).run()


class BackgroundServer:
    """``app`` served on a thread, on a port bound before the thread starts (``port=0``: a free
    one), for tests, benchmarks and embedding. Use as a context manager; ``url`` is its address."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self._server = uvicorn.Server(_config(app, self.host, self.port, "warning"))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> BackgroundServer:
        """Start serving and wait until the app's startup has finished."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish, shut the app down and join the thread."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
