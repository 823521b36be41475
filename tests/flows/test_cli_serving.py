"""``serve-model`` as a real process (uvicorn, a registry alias) and ``predict`` on a folder."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flows.cli import main
from tests.conftest import bomb_png, png_bytes, register_tiny_versions, write_photo

REPO = Path(__file__).resolve().parents[2]
LABELS = ["ant", "bee"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    register_tiny_versions(uri, "tiny", LABELS, (32,), alias="champion")
    return uri


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM line")


@pytest.fixture(scope="module")
def served(registry: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    port = _free_port()
    args = [
        sys.executable,
        "-m",
        "flows.cli",
        "serve-model",
        "--model-uri",
        "models:/tiny",  # the serving alias: champion
        "--port",
        str(port),
        "--output-dir",
        str(tmp_path_factory.mktemp("out")),
        "--set",
        f"tracking.tracking_uri={registry}",
        "--set",
        "serve.limits.image_pixels=100000000",
        "--set",
        "serve.limits.decoded_bytes=64000000",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):  # bounded polling, not a timing assertion
            if proc.poll() is not None:
                raise AssertionError(f"serve-model exited: {log.read_text()}")
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert code == 0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_served_model_answers_and_refuses_a_bomb_without_decoding_it(
    served: tuple[str, int],
) -> None:
    url, pid = served
    with httpx.Client(base_url=url, timeout=30) as client:
        meta = client.get("/v2/models/tiny").json()
        assert meta["name"] == "tiny" and meta["versions"] == ["1"]
        for seed in range(3):
            ok = client.post("/v1/classify", content=png_bytes(seed=seed))
            assert ok.status_code == 200 and ok.json()["model_version"] == "1"
        before = _peak_rss_kb(pid)
        for _ in range(4):
            refused = client.post("/v1/classify", content=bomb_png())
            assert refused.status_code == 413
            assert "over the limit of 64000000" in refused.json()["error"]
        grown_mb = (_peak_rss_kb(pid) - before) / 1024
    # Decoded, each bomb would take 324 MB with its RGB copy; refused from its header, nearly 0.
    assert grown_mb < 40


def test_predict_scores_a_folder_into_a_csv(
    registry: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "photos"
    for i in range(5):
        write_photo(data / f"{i}.jpg", seed=i)
    (data / "broken.png").write_bytes(b"nope")
    out = tmp_path / "predictions.csv"
    code = main(
        [
            "predict",
            "--model-uri",
            "models:/tiny@champion",
            "--data",
            str(data),
            "--out",
            str(out),
            "--output-dir",
            str(tmp_path / "out"),
            "--set",
            f"tracking.tracking_uri={registry}",
        ]
    )
    assert code == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows] == [f"{i}.jpg" for i in range(5)]
    assert {r["label"] for r in rows} <= set(LABELS)
    err = capsys.readouterr().err
    assert "tiny version 1: 5 images scored" in err
    assert "broken.png: UnidentifiedImageError" in err


def test_predict_names_a_missing_model(registry: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "d").mkdir()
    code = main(
        [
            "predict",
            "--model-uri",
            "models:/nosuch@champion",
            "--data",
            str(tmp_path / "d"),
            "--set",
            f"tracking.tracking_uri={registry}",
        ]
    )
    assert code == 2
    assert "cannot load models:/nosuch@champion" in capsys.readouterr().err
