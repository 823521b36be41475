"""Prefect's temporary API server, owned by the CLI process: it dies with it, however it dies.

Prefect's ``SubprocessASGIServer`` picks a port by binding and releasing it, then starts uvicorn on
it (two processes can pick the same one: "address already in use"), and stops its server only from
``atexit``, which a SIGKILL never runs. ``OwnedAPIServer`` replaces both parts:

- the port: the CLI binds and listens on ``127.0.0.1:0`` itself, so the kernel hands every process
  a distinct free port, and passes the listening socket to the server process, which serves on it.
  There is no window between choosing a port and holding it.
- the lifetime: the server process runs a watchdog thread that stops it as soon as its parent is
  gone (``os.getppid()`` changes when the parent dies, whatever killed it). ``PR_SET_PDEATHSIG``
  alone would not do: Linux sends it when the *thread* that forked the child ends, and the server is
  started from a background thread that ends seconds later.

Prefect keeps one server object per port key and asks for ``SubprocessASGIServer()`` wherever it
needs the API; ``OwnedAPIServer()`` registers itself under that same key, so every client of the
process (flow engine, logs, events) finds this server already running.

Run as ``python -m flows.ephemeral_api FD PARENT_PID`` this module is the server process.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import (
    PREFECT_HOME,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    get_current_settings,
)

logger = logging.getLogger(__name__)
_ROOT = Path(__file__).resolve().parents[1]
WATCH_INTERVAL_S = 0.2  # how often the server process checks that its parent is alive
_GRACE_S = 3.0  # after its parent died, how long the server may take to stop before it is cut
MIN_STARTUP_WAIT_S = 120.0  # the least the CLI waits for the server to answer


class OwnedAPIServer(SubprocessASGIServer):
    """A ``SubprocessASGIServer`` on a socket this process holds, stopped when this process ends."""

    _listener: socket.socket | None = None

    def find_available_port(self) -> int:
        """Bind ``127.0.0.1:0`` and keep the socket listening: the port is ours from this moment."""
        if self._listener is not None:
            self._listener.close()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(2048)
        self._listener = listener
        return int(listener.getsockname()[1])

    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        if self._listener is None:
            self.port = self.find_available_port()
        listener = self._listener
        assert listener is not None
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **get_current_settings().to_environment_variables(exclude_unset=True),
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(_ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
        fd = listener.fileno()
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.ephemeral_api", str(fd), str(os.getpid())],
            env=env,
            pass_fds=(fd,),
        )
        # The server process holds its own copy; ours would only keep the port after it exits.
        listener.close()
        self._listener = None
        return process

    def start(self, timeout: int | None = None) -> None:
        """Start the server process and wait until it answers; a no-op once it runs.

        Prefect's own wait treats a refused connection as "not yet"; here the socket listens from
        the start, so a connection is accepted at once and only answered once the server has
        booted: a slow answer is "not yet" too.
        """
        if self.running:
            return
        # Prefect's 20 s default is too short here: the server boots while this process imports
        # torch and the backbone, and a fresh database is migrated first.
        setting = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        wait = float(timeout or max(setting, MIN_STARTUP_WAIT_S))
        with _boot_lock():
            self._start(wait)

    def _start(self, wait: float) -> None:
        self.port = self.find_available_port()
        self.running = True
        logger.info("temporary Prefect API server on %s", self.address)
        try:
            self.server_process = self._run_uvicorn_command()
            atexit.register(self.stop)
            deadline = time.monotonic() + wait
            with httpx.Client(timeout=httpx.Timeout(wait)) as client:
                while True:
                    if (code := self.server_process.poll()) is not None:
                        raise RuntimeError(
                            f"the ephemeral Prefect API server exited with code {code}"
                        )
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise RuntimeError(
                            f"timed out after {wait:.0f} s waiting for the ephemeral Prefect API "
                            f"server on {self.address}"
                        )
                    try:
                        if client.get(f"{self.api_url}/health", timeout=left).status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                    time.sleep(0.1)
        except BaseException:
            self.stop()
            raise


@contextmanager
def _boot_lock() -> Iterator[None]:
    """Held while a server of this ``PREFECT_HOME`` boots: servers started together share its
    database, and two of them migrating a fresh one at once fail ("duplicate column name")."""
    try:
        import fcntl
    except ImportError:  # not POSIX: boots are not serialised
        yield
        return
    home = Path(PREFECT_HOME.value())
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".ephemeral-api-boot.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or this process dies
        yield


def start_owned_server() -> OwnedAPIServer:
    """The process's Prefect API server, started (and waited for) unless it already runs."""
    server = OwnedAPIServer()
    server.start()
    return server


def _watch_parent(parent: int) -> None:
    """Stop this process once ``parent`` is no longer its parent (it died and we were adopted)."""
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL_S)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful stop: the database is closed
    time.sleep(_GRACE_S)
    os._exit(1)


def serve(fd: int, parent: int) -> None:
    """Serve Prefect's API on the listening socket ``fd`` for as long as ``parent`` lives."""
    import uvicorn

    if os.getppid() != parent:  # the parent died before we got here
        return
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()
    config = uvicorn.Config(
        "prefect.server.api.server:create_app",
        factory=True,
        log_level="error",
        lifespan="on",
    )
    uvicorn.Server(config).run(sockets=[socket.socket(fileno=fd)])


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
