"""Prometheus metrics of one server: requests, latency, batch sizes and the model version served.

Each app gets its own ``CollectorRegistry``: the process-wide default would mix two servers in one
process (tests, benchmarks) and refuses a second registration of the same names.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from components.deploy.limits import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """The server's collectors, registered in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "serve_requests",
            "HTTP requests by route and status",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "serve_request_latency_seconds",
            "Time from the request's arrival to its last response byte",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "serve_batch_size",
            "Images per ONNX Runtime call",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.model_info = Gauge(
            "serve_model_info",
            "1 for the model version being served",
            ["name", "version"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "serve_model_reloads",
            "Registry checks that loaded a new version, or failed to",
            ["outcome"],
            registry=self.registry,
        )

    def serving(self, name: str, version: str) -> None:
        """Point the version gauge at ``name``/``version`` (only one series reads 1)."""
        self.model_info.clear()
        self.model_info.labels(name=name, version=version).set(1)

    def render(self) -> bytes:
        """The text exposition format, for ``GET /metrics``."""
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware counting every response by route template (not raw path: bounded labels)
    and status, and timing it."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, scope.get("method", ""), str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
