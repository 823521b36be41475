"""Load test of the model server against a plain PyTorch eager server, and hot reload under load.

    python benchmarks/serve_load.py [--data DIR] [--model-uri models:/NAME@ALIAS --tracking-uri URI]
                                    [--requests 192] [--clients 1 8 32] [--json OUT]

Without ``--model-uri`` it builds the model itself: EfficientNet-Lite0 (the pipeline's default
backbone, local weights) with a new two-class head, exported by the pipeline's own ``export_onnx``
(parity-checked) and registered twice in a temporary SQLite registry (version 2 has another
head), alias ``champion`` on version 1. With ``--model-uri`` only our server is measured (there
is no PyTorch module to build the baseline from, nor a second version to move to). Request images are the first ``--images`` image files
under ``--data`` (sorted), or generated photos.

Both servers run as their own processes on 127.0.0.1 under the same uvicorn: ours is
``transfer-pipeline serve-model`` (micro-batched ONNX Runtime); the baseline is a minimal FastAPI
app built here from the same network, doing one PyTorch eager forward per request in FastAPI's
thread pool, with the same preprocessing (``engine.images``). The clients are httpx async clients
in this process, each sending raw image bytes to ``POST /v1/classify`` until ``--requests`` have
been answered (after a warm-up of two requests per client). Finally 32 clients load our server
while the alias moves to version 2: every request must be answered, and the answers switch over.
The client shares the machine's CPUs with the server, as a sidecar would.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TQDM_DISABLE", "1")

import httpx
import numpy as np
from fastapi import Request  # module level: FastAPI resolves the endpoint's annotations here
from fastapi.responses import JSONResponse

REPO = Path(__file__).resolve().parent.parent
NAME = "serve-bench"
LABELS = ["first", "second"]


# -- the baseline: one PyTorch eager forward per request ---------------------------------------


def torch_app(weights: Path) -> Any:
    """A minimal FastAPI classifier around the same network, eager PyTorch, one image a request."""
    import torch
    from fastapi import FastAPI
    from starlette.concurrency import run_in_threadpool

    from components.engine.backbones import fresh_model, load_backbone
    from components.engine.images import EvalTransform, open_image

    backbone = load_backbone("efficientnet_lite0")
    model = fresh_model(backbone, len(LABELS), copy_backbone=False)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    transform = EvalTransform(backbone.preprocessing)
    app = FastAPI()

    def forward(data: bytes) -> dict[str, Any]:
        x = transform(open_image(io.BytesIO(data)))[None]
        with torch.inference_mode():
            probs = torch.softmax(model(x), dim=1)[0].tolist()
        best = int(np.argmax(probs))
        return {
            "label": LABELS[best],
            "score": probs[best],
            "probabilities": dict(zip(LABELS, probs, strict=True)),
        }

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v1/classify")
    async def classify(request: Request) -> JSONResponse:
        prediction = await run_in_threadpool(forward, await request.body())
        return JSONResponse({"model_version": "eager", "predictions": [prediction]})

    return app


# -- building and registering the model ---------------------------------------------------------


def build_registry(root: Path) -> tuple[str, Path]:
    """Lite0 with a new head, exported and registered as versions 1 and 2; returns the tracking
    URI and version 1's PyTorch weights (for the baseline)."""
    import torch
    from mlflow import MlflowClient

    from components.common.config import ExportConfig, TrackingConfig
    from components.deploy import tracking
    from components.deploy.export import export_onnx
    from components.engine.backbones import fresh_model, load_backbone

    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    backbone = load_backbone("efficientnet_lite0")
    prep = backbone.preprocessing
    cfg = TrackingConfig(tracking_uri=uri, experiment="serve-bench")
    weights = root / "v1.pt"
    for version in (1, 2):
        torch.manual_seed(version)
        model = fresh_model(backbone, len(LABELS), copy_backbone=True).eval()
        if version == 1:
            torch.save(model.state_dict(), weights)
        sample = torch.randn(3, 3, prep.image_size, prep.image_size)
        out = root / f"v{version}"
        onnx_path = export_onnx(model, sample, out / "model.onnx", ExportConfig()).onnx_path
        run_id = tracking.start_run(cfg, out, f"v{version}", {})
        tracking.register_onnx_model(
            run_id, onnx_path, NAME, LABELS, prep.to_dict(), "candidate", uri
        )
        tracking.finish_run(run_id, tracking_uri=uri)
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(
        NAME, "champion", "1"
    )
    return uri, weights


def request_images(data: Path | None, n: int) -> list[bytes]:
    """The bytes of ``n`` image files under ``data`` (sorted), or of ``n`` generated photos."""
    if data is not None:
        from components.common.config import DataConfig
        from components.deploy.batch_predict import image_files

        return [p.read_bytes() for p in image_files(data, DataConfig().extensions)[:n]]
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        base = rng.random((31, 41, 3))
        img = Image.fromarray((base * 255).astype(np.uint8)).resize((400, 300), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# -- servers as processes -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start a server process; return it and its URL once it says it is ready."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [*args, "--port", str(port)], cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    for _ in range(3000):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text()}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, every thread included (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


# -- the load -----------------------------------------------------------------------------------


async def load(
    url: str,
    pid: int,
    images: list[bytes],
    clients: int,
    requests: int,
    during: Any = None,
) -> dict[str, Any]:
    """``clients`` concurrent clients sending images until ``requests`` are answered.

    ``during``: a blocking callable run in a thread once a third of the requests are done (the
    alias move of the hot-reload run).
    """
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    latencies: list[float] = []
    errors: list[str] = []
    versions: list[str] = []
    issued = 0

    async def client(http: httpx.AsyncClient, k: int, count: int | None) -> None:
        nonlocal issued
        i = k
        while True:
            if count is None:
                if issued >= requests:
                    return
                issued += 1
            elif i >= k + count:
                return
            start = time.perf_counter()
            try:
                r = await http.post("/v1/classify", content=images[i % len(images)])
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                elif count is None:
                    latencies.append(time.perf_counter() - start)
                    versions.append(r.json()["model_version"])
            except httpx.HTTPError as err:
                errors.append(f"{type(err).__name__}: {err}")
            i += 1

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(http, k, 2) for k in range(clients)))  # warm-up
        errors.clear()
        cpu_start = cpu_seconds(pid)
        start = time.perf_counter()
        tasks = [asyncio.create_task(client(http, k, None)) for k in range(clients)]
        if during is not None:
            while len(latencies) + len(errors) < requests // 3:
                await asyncio.sleep(0.005)
            await asyncio.to_thread(during)
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
        cpu = cpu_seconds(pid) - cpu_start
    ms = np.array(latencies) * 1000
    switched = [i for i, v in enumerate(versions) if v != versions[0]] if versions else []
    return {
        "clients": clients,
        "requests": requests,
        "answered": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:5],
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
        "images_per_s": len(latencies) / wall,
        "wall_s": wall,
        "server_cpu_ms_per_image": 1000 * cpu / max(1, len(latencies)),
        "versions": {v: versions.count(v) for v in sorted(set(versions))},
        "first_new_version_at": switched[0] if switched else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="a folder of images to send")
    parser.add_argument("--images", type=int, default=64, help="distinct request images")
    parser.add_argument("--model-uri", help="models:/NAME@ALIAS of a registered model")
    parser.add_argument("--tracking-uri", help="with --model-uri: its MLflow tracking URI")
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--reload-requests", type=int, default=480)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--serve-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra --set for our server, e.g. serve.max_batch=8",
    )
    parser.add_argument("--torch-server", type=Path, help=argparse.SUPPRESS)  # internal
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.torch_server is not None:
        from components.deploy.server import serve

        serve(torch_app(args.torch_server), "127.0.0.1", args.port)
        return

    from report import machine, write_result

    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    if args.model_uri:
        if args.tracking_uri is None:
            parser.error("--model-uri needs --tracking-uri")
        uri, model_uri, weights = args.tracking_uri, args.model_uri, None
    else:
        uri, weights = build_registry(tmp)
        model_uri = f"models:/{NAME}@champion"
    images = request_images(args.data, args.images)
    print(f"{len(images)} request images, mean {np.mean([len(b) for b in images]) / 1e3:.0f} KB")

    ours_cmd = [
        sys.executable, "-m", "flows.cli", "serve-model", "--model-uri", model_uri,
        "--output-dir", str(tmp / "out"), "--set", f"tracking.tracking_uri={uri}",
        "--set", "serve.reload_poll_s=0.5",
        *(x for kv in args.serve_set for x in ("--set", kv)),
    ]  # fmt: skip
    servers = {"ours (ONNX Runtime, micro-batched)": ours_cmd}
    if weights is not None:
        servers["PyTorch eager, per request"] = [
            sys.executable, str(Path(__file__).resolve()), "--torch-server", str(weights),
        ]  # fmt: skip
    # Both servers stay up and each concurrency level runs on one, then the other, so a change
    # in the machine's load (it is shared) hits both alike.
    started = {}
    try:
        for i, (label, cmd) in enumerate(servers.items()):
            started[label] = start_server(cmd, tmp / f"server-{i}.log")
        runs: list[dict[str, Any]] = []
        for clients in args.clients:
            for label, (proc, url) in started.items():
                result = asyncio.run(load(url, proc.pid, images, clients, args.requests))
                runs.append({"server": label, **result})
                print(_row(runs[-1]), flush=True)
    finally:
        for proc, _ in started.values():
            stop_server(proc)

    reload_run = None
    if args.model_uri is None:
        from mlflow import MlflowClient

        def move_alias() -> None:
            MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(
                NAME, "champion", "2"
            )

        proc, url = start_server(ours_cmd, tmp / "reload.log")
        try:
            reload_run = asyncio.run(
                load(url, proc.pid, images, 32, args.reload_requests, move_alias)
            )
            reload_run["server"] = "ours, alias moved at a third"
            print(_row(reload_run), f"versions {reload_run['versions']}", flush=True)
        finally:
            stop_server(proc)

    print("\n" + table(runs, reload_run))
    write_result(
        {
            "benchmark": "serve_load",
            "machine": machine(load_start=load_start, load_end=os.getloadavg()),
            "images": len(images),
            "data": "/".join(args.data.parts[-2:]) if args.data else "generated 400x300 JPEGs",
            "runs": runs,
            "reload": reload_run,
            "speedup_32": _speedup(runs, 32),
        },
        args.json,
    )


def _speedup(runs: list[dict[str, Any]], clients: int) -> float | None:
    rates = [r["images_per_s"] for r in runs if r["clients"] == clients]
    return rates[0] / rates[1] if len(rates) == 2 else None


def _row(r: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    return (
        f"| {r['server']} | {r['clients']} | {r['answered']}/{r['requests']} | "
        f"{ms(r['p50_ms'])} | {ms(r['p99_ms'])} | {r['images_per_s']:.1f} | "
        f"{r['server_cpu_ms_per_image']:.1f} | {r['errors']} |"
    )


def table(runs: list[dict[str, Any]], reload_run: dict[str, Any] | None) -> str:
    """The Markdown table of docs/benchmarks.md."""
    lines = [
        "| server | clients | answered | p50 ms | p99 ms | images/s | server CPU ms/image | errors |",
        "|---|---|---|---|---|---|---|---|",
        *(_row(r) for r in runs),
    ]
    if reload_run is not None:
        lines.append(_row(reload_run))
    for clients in sorted({r["clients"] for r in runs}):
        if (s := _speedup(runs, clients)) is not None:
            lines.append(f"\n{clients} clients: {s:.2f}x the PyTorch server's images/s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
