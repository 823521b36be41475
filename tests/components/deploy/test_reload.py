"""Hot reload against a real MLflow SQLite registry: the alias moves under load, nothing is lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from components.common.config import ServeConfig
from components.deploy.reload import ModelHolder, with_alias
from components.deploy.server import BackgroundServer
from components.deploy.serving_app import create_app
from components.engine.images import Preprocessing, preprocess_file
from tests.conftest import png_bytes, register_tiny_versions

LABELS = ["ant", "bee"]
SIZES = (32, 40)  # the versions differ in preprocessing too: a request must stay on its version


@pytest.fixture
def registry(tmp_path: Path) -> tuple[str, list[nn.Module]]:
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    return uri, register_tiny_versions(uri, "tiny", LABELS, SIZES, alias="champion")


def _expected(models: list[nn.Module], images: list[bytes], tmp_path: Path) -> dict[str, list]:
    """Per version, the probabilities PyTorch gives each image with that version's preprocessing."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    out: dict[str, list] = {}
    for version, (model, size) in enumerate(zip(models, SIZES, strict=True), start=1):
        prep = Preprocessing(image_size=size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        rows = []
        for i, data in enumerate(images):
            (tmp_path / f"{i}.png").write_bytes(data)
            x = torch.from_numpy(preprocess_file(tmp_path / f"{i}.png", prep))[None]
            with torch.inference_mode():
                rows.append(torch.softmax(model(x), dim=1)[0].numpy())
        out[str(version)] = rows
    return out


def test_with_alias_fills_in_the_serving_alias_only_for_a_bare_name() -> None:
    assert with_alias("models:/tiny", "champion") == "models:/tiny@champion"
    assert with_alias("models:/tiny/", "champion") == "models:/tiny@champion"
    assert with_alias("models:/tiny/3", "champion") == "models:/tiny/3"
    assert with_alias("models:/tiny@candidate", "champion") == "models:/tiny@candidate"


def test_a_pinned_version_is_never_reloaded(registry: tuple[str, list[nn.Module]]) -> None:
    uri, _ = registry
    holder = ModelHolder.from_registry("models:/tiny/1", uri, threads=1)
    try:
        MlflowClient(tracking_uri=uri).set_registered_model_alias("tiny", "champion", "2")
        assert not holder.follows_alias
        assert holder.refresh() is False and holder.current.version == "1"
    finally:
        holder.close()


def test_the_alias_moves_under_load_and_no_request_is_lost(
    registry: tuple[str, list[nn.Module]], tmp_path: Path
) -> None:
    uri, models = registry
    images = [png_bytes((50, 44), seed=i) for i in range(4)]
    expected = _expected(models, images, tmp_path / "expected")
    holder = ModelHolder.from_registry("models:/tiny@champion", uri, threads=1)
    first_dir = holder.current.onnx_path.parent
    cfg = ServeConfig(max_batch=8, max_wait_ms=2, reload_poll_s=0.05, decode_threads=2)
    app = create_app(holder, cfg)
    results: list[tuple[int, str, int, list[float]] | BaseException] = []

    async def client_loop(client: httpx.AsyncClient, k: int, stop: asyncio.Event) -> None:
        i = k
        while not stop.is_set():
            try:
                r = await client.post("/v1/classify", content=images[i % len(images)])
                body = r.json()
                pred = body["predictions"][0] if r.status_code == 200 else {}
                probs = [pred.get("probabilities", {}).get(lab, -1.0) for lab in LABELS]
                results.append((r.status_code, body.get("model_version", ""), i % 4, probs))
            except Exception as err:  # a dropped connection would land here
                results.append(err)
            i += 1

    async def load() -> None:
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
            tasks = [asyncio.create_task(client_loop(client, k, stop)) for k in range(8)]
            while len(results) < 40:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(
                MlflowClient(tracking_uri=uri).set_registered_model_alias, "tiny", "champion", "2"
            )
            # Bounded by request count, not time: stop once version 2 has answered 40 times.
            while sum(1 for r in results if isinstance(r, tuple) and r[1] == "2") < 40:
                assert len(results) < 20_000, "the new version was never served"
                await asyncio.sleep(0.01)
            stop.set()
            await asyncio.gather(*tasks)

    with BackgroundServer(app) as srv:
        asyncio.run(load())
        meta = httpx.get(f"{srv.url}/v2/models/tiny").json()
        metrics = httpx.get(f"{srv.url}/metrics").text
    holder.close()

    errors = [r for r in results if not isinstance(r, tuple) or r[0] != 200]
    assert errors == []
    assert {r[1] for r in results} == {"1", "2"}  # type: ignore[index]
    for _, version, image, probs in results:  # type: ignore[misc]
        np.testing.assert_allclose(probs, expected[version][image], rtol=1e-4, atol=1e-5)
    assert meta["versions"] == ["2"] and meta["inputs"][0]["shape"] == [-1, 3, 40, 40]
    assert 'serve_model_info{name="tiny",version="2"} 1.0' in metrics
    assert 'serve_model_reloads_total{outcome="loaded"} 1.0' in metrics
    assert not first_dir.exists()  # version 1's download is gone once it is no longer served
