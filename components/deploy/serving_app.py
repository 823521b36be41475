"""The model server as a FastAPI app: Open Inference Protocol v2 and an image endpoint.

Routes (``docs/architecture.md`` has the JSON): ``GET /v2/health/live``, ``/v2/health/ready``,
``/v2``, ``/v2/models/{name}[/versions/{v}]``, ``.../ready``, ``POST .../infer`` (FP32 tensors in,
logits out), ``POST /v1/classify`` (image bytes, or a multipart batch of files, in; labels and
probabilities out) and ``GET /metrics`` (Prometheus).

Nothing heavy runs on the event loop: decoding and JSON parsing go to a thread pool behind a
semaphore (the bound on decoded memory), and the network runs in micro-batches on threads of its
own (ONNX Runtime, Pillow and NumPy release the GIL).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import Any, TypeVar

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from components.common.config import ServeConfig, ServeLimits
from components.deploy import oip
from components.deploy.batching import MicroBatcher
from components.deploy.classifier import OnnxClassifier
from components.deploy.limits import BodyLimit, Refused, check_image_count, decode_image, parse_json
from components.deploy.metrics import RequestMetrics, ServerMetrics
from components.deploy.reload import ModelHolder
from components.engine.extraction import extraction_batch
from components.engine.onnx_graphs import available_cpus

log = logging.getLogger(__name__)

SERVER_NAME = "transfer-pipeline"
T = TypeVar("T")


@dataclass
class _Runtime:
    """What exists only while the app runs (made in its lifespan, inside the event loop)."""

    batcher: MicroBatcher[OnnxClassifier]
    decode_pool: ThreadPoolExecutor
    decodes: asyncio.Semaphore

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the decode pool, holding a semaphore slot until the thread is done
        (not merely until a client that went away stops waiting: the bound must hold)."""
        await self.decodes.acquire()
        loop = asyncio.get_running_loop()
        try:
            future = self.decode_pool.submit(fn, *args)
        except BaseException:
            self.decodes.release()
            raise
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self.decodes.release))
        return await asyncio.wrap_future(future)


def create_app(
    holder: ModelHolder, cfg: ServeConfig, metrics: ServerMetrics | None = None
) -> FastAPI:
    """The server for ``holder``'s model, with ``cfg``'s batching, limits and reload interval."""
    metrics = metrics or ServerMetrics()
    state: dict[str, _Runtime] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        cpus = available_cpus()
        decode_pool = ThreadPoolExecutor(cfg.decode_threads or cpus, thread_name_prefix="decode")
        infer_pool = ThreadPoolExecutor(cfg.batch_runners, thread_name_prefix="infer")
        batcher = MicroBatcher(
            _run_logits,
            infer_pool,
            max_batch(cfg, holder.current),
            cfg.max_wait_ms / 1000,
            cfg.batch_runners,
            metrics.batch_size.observe,
        )
        batcher.start()
        in_flight = cfg.limits.decodes_in_flight or 2 * cpus
        state["rt"] = _Runtime(batcher, decode_pool, asyncio.Semaphore(in_flight))
        holder.on_swap(lambda m: metrics.serving(m.name, m.version))
        poller = None
        if holder.follows_alias and cfg.reload_poll_s > 0:
            poller = asyncio.create_task(_poll(holder, cfg.reload_poll_s, metrics))
        try:
            yield
        finally:
            if poller is not None:
                poller.cancel()
                await asyncio.gather(poller, return_exceptions=True)
            await batcher.stop()
            decode_pool.shutdown(wait=True, cancel_futures=True)
            infer_pool.shutdown(wait=True)
            state.clear()

    app = FastAPI(title=SERVER_NAME, lifespan=lifespan, docs_url=None, redoc_url=None)
    _add_error_handlers(app)

    def runtime() -> _Runtime:
        if "rt" not in state:
            raise Refused(503, "the server is starting or stopping")
        return state["rt"]

    def model_for(name: str, version: str | None) -> OnnxClassifier:
        model = holder.current  # read once: the request stays on this version to the end
        if name != model.name:
            raise Refused(404, f"unknown model {name!r}; this server serves {model.name!r}")
        if version is not None and version != model.version:
            raise Refused(
                404, f"{name} version {version} is not served; version {model.version} is"
            )
        return model

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        up = "rt" in state
        return JSONResponse({"ready": up}, status_code=200 if up else 503)

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return oip.server_metadata(SERVER_NAME, _package_version())

    async def model_metadata(name: str, version: str | None = None) -> dict[str, Any]:
        return oip.model_metadata(model_for(name, version))

    async def model_ready(name: str, version: str | None = None) -> JSONResponse:
        model_for(name, version)
        up = "rt" in state
        return JSONResponse({"name": name, "ready": up}, status_code=200 if up else 503)

    async def infer(request: Request, name: str, version: str | None = None) -> JSONResponse:
        model = model_for(name, version)
        rt = runtime()
        body = await request.body()
        request_id, x = await rt.offload(_parse_infer, body, model, cfg.limits)
        logits = await rt.batcher.submit(model, x)
        return JSONResponse(oip.infer_response(model, request_id, logits))

    for suffix, endpoint, method in (
        ("", model_metadata, "GET"),
        ("/ready", model_ready, "GET"),
        ("/infer", infer, "POST"),
    ):
        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            app.add_api_route(prefix + suffix, endpoint, methods=[method])

    @app.post("/v1/classify")
    async def classify(request: Request) -> JSONResponse:
        model = holder.current
        rt = runtime()
        files = await _request_images(request, cfg.limits)
        prep = model.preprocessing
        arrays = await asyncio.gather(
            *(rt.offload(decode_image, data, prep, cfg.limits, name) for name, data in files)
        )
        logits = await rt.batcher.submit(model, np.concatenate(arrays))
        predictions = [
            {"file": name, **p}
            for (name, _), p in zip(files, model.predictions(logits), strict=True)
        ]
        return JSONResponse(
            {"model_name": model.name, "model_version": model.version, "predictions": predictions}
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(BodyLimit, max_bytes=cfg.limits.body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: it sees every response
    app.state.metrics = metrics
    app.state.holder = holder
    return app


def max_batch(cfg: ServeConfig, model: OnnxClassifier) -> int:
    """Images per ONNX Runtime call: ``cfg.max_batch``, else the extraction engine's batch for the
    model's image size on the device its session runs on."""
    if cfg.max_batch is not None:
        return cfg.max_batch
    on_gpu = model.session.get_providers()[0] == "CUDAExecutionProvider"
    return extraction_batch(
        model.preprocessing.image_size, torch.device("cuda" if on_gpu else "cpu")
    )


def inference_threads(cfg: ServeConfig) -> int:
    """ONNX Runtime threads per session: ``cfg.inference_threads``, else the CPUs shared evenly
    between the batch runners."""
    return cfg.inference_threads or max(1, available_cpus() // cfg.batch_runners)


def _run_logits(model: OnnxClassifier, batch: np.ndarray) -> np.ndarray:
    return model.logits(batch)


def _parse_infer(
    body: bytes, model: OnnxClassifier, limits: ServeLimits
) -> tuple[str | None, np.ndarray]:
    return oip.parse_infer_request(parse_json(body), model, limits)


async def _request_images(request: Request, limits: ServeLimits) -> list[tuple[str, bytes]]:
    """(name, bytes) per image: every file of a multipart form, or the raw body as one image."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=limits.request_images, max_fields=16)
        except HTTPException as err:  # Starlette stops parsing at the first file over the limit
            if "Too many files" not in str(err.detail):
                raise
            raise Refused(
                413,
                f"more than {limits.request_images} images in one request; the limit is "
                f"{limits.request_images} (serve.limits)",
            ) from None
        try:
            files = [
                (value.filename or key, await value.read())
                for key, value in form.multi_items()
                if isinstance(value, UploadFile)
            ]
        finally:
            await form.close()
    else:
        body = await request.body()
        files = [("body", body)] if body else []
    check_image_count(len(files), limits)
    return files


async def _poll(holder: ModelHolder, interval_s: float, metrics: ServerMetrics) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            if await asyncio.to_thread(holder.refresh):
                metrics.reloads.labels("loaded").inc()
        except Exception:
            log.exception(
                "checking %s for a new version failed; still serving version %s",
                holder.source.model_uri if holder.source else "?",
                holder.current.version,
            )
            metrics.reloads.labels("failed").inc()


def _add_error_handlers(app: FastAPI) -> None:
    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(Refused)
    async def refused(_: Request, err: Refused) -> JSONResponse:
        return error(err.status, err.message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        message = str(err.detail)
        if err.status_code in (404, 405):
            message = (
                f"no route {request.method} {request.url.path}; see GET /v2, "
                "GET /v2/models/{name}, POST /v2/models/{name}/infer and POST /v1/classify"
            )
        return error(err.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return error(400, f"invalid request: {err.errors()}")

    @app.exception_handler(Exception)
    async def crashed(_: Request, err: Exception) -> JSONResponse:
        log.error("request failed: %s", err, exc_info=err)
        return error(500, "inference failed; see the server log")


def _package_version() -> str:
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:
        return "0"
