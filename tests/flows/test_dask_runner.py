"""``run.task_runner`` on Dask: the scan and the embedding run in shards on a real 2-worker
``LocalCluster`` and give what one process gives: the same manifest, byte for byte, and the same
cached features, bit for bit (each shard runs the very batches the single process runs, with one
ONNX Runtime thread per batch in both, so the arithmetic is the same)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from components.common.config import PipelineConfig, build_config
from components.common.errors import ConfigError
from components.data.demo_data import materialise_digits
from components.engine.cache import RowCache
from flows.transfer import plan_flow
from tasks.common.sharding import open_shards

SHARD = 16  # files per scan shard (80 files: 5 shards); embedding shards round up to a batch


def _config(out: Path, task_runner: str, **run: Any) -> PipelineConfig:
    return build_config(
        {
            "output_dir": str(out),
            # Rule resolution and a small similarity sample: the embedding then computes every
            # image at the chosen size, which is the work the shards must do.
            "strategy": {"verify": "off", "resolution": "rule"},
            "similarity": {"sample_size": 8, "bootstrap_rounds": 20},
            "run": {"task_runner": task_runner, "shard_images": SHARD, **run},
        }
    )


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return materialise_digits(tmp_path_factory.mktemp("dask") / "digits", per_class=8)


@pytest.fixture(scope="module")
def local_run(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("local")
    return plan_flow(data=str(digits), config=_config(out, "local")) | {"out": out}


def _rows(out: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every cached row under ``out``, by cache folder and image sha256."""
    folders = {chunk.parent for chunk in (out / "cache").rglob("chunk-*.npz")}
    caches = {f.name: RowCache(f) for f in folders}
    return {name: dict(zip(c.shas(), c.get(c.shas()), strict=True)) for name, c in caches.items()}


def _chunk_pids(out: Path, image_size: int) -> set[int]:
    """PIDs of the processes that wrote the feature chunks at ``image_size``."""
    chunks = (out / "cache").glob(f"*-{image_size}px-*/chunk-*.npz")
    return {int(c.name.split("-")[1]) for c in chunks}


def _assert_same_as_local(run: dict[str, Any], local: dict[str, Any]) -> None:
    manifest, expected = (Path(r["run_dir"]) / "manifest.csv" for r in (run, local))
    assert manifest.read_bytes() == expected.read_bytes()
    rows, expected_rows = _rows(run["out"]), _rows(local["out"])
    assert rows.keys() == expected_rows.keys()
    for folder, by_sha in expected_rows.items():
        assert by_sha.keys() == rows[folder].keys(), folder
        for sha, row in by_sha.items():
            np.testing.assert_array_equal(rows[folder][sha], row, err_msg=f"{folder} {sha}")
    for key in ("case", "cut", "image_size", "counts", "similarity", "quarantined"):
        assert run[key] == local[key], key


@pytest.fixture
def cluster() -> Iterator[Any]:
    """A real 2-worker LocalCluster (one process, one thread each), closed after the test."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",
        ) as cluster,
        # Not the default client: the flow must reach the cluster by the address it is given.
        Client(cluster, set_as_default=False) as client,
    ):
        yield client


@pytest.mark.slow
def test_shards_on_a_running_scheduler_match_one_process(
    digits: Path, local_run: dict[str, Any], cluster: Any, tmp_path: Path
) -> None:
    from distributed import get_task_stream

    workers = set(cluster.scheduler_info()["workers"])
    worker_pids = set(cluster.run(os.getpid).values())
    assert len(workers) == 2 and os.getpid() not in worker_pids
    cfg = _config(tmp_path, f"dask:{cluster.scheduler.address}")
    with get_task_stream(client=cluster) as stream:
        run = plan_flow(data=str(digits), config=cfg) | {"out": tmp_path}
    _assert_same_as_local(run, local_run)
    # 32 px scans are embedded below the native 224 px, where no other stage computed features.
    assert run["image_size"] != 224

    ran_on: dict[str, set[str]] = {}
    for record in stream.data:
        ran_on.setdefault(record["key"].split("-")[0], set()).add(record["worker"])
    # 80 files in shards of 16, and 80 images in shards of whole batches: both kinds of shard ran
    # on the cluster, and the cluster's two workers both took some.
    assert {"inspect_shard", "embed_shard"} <= ran_on.keys()
    assert set().union(*ran_on.values()) == workers
    # The features at the chosen size were written by the workers, none by this process.
    assert _chunk_pids(tmp_path, run["image_size"]) <= worker_pids
    assert not _chunk_pids(local_run["out"], run["image_size"]) & worker_pids


@pytest.mark.slow
def test_a_local_cluster_of_its_own_matches_one_process_and_is_closed(
    digits: Path, local_run: dict[str, Any], tmp_path: Path
) -> None:
    cfg = _config(tmp_path, "dask", dask_workers=2)
    run = plan_flow(data=str(digits), config=cfg) | {"out": tmp_path}
    _assert_same_as_local(run, local_run)
    pids = _chunk_pids(tmp_path, run["image_size"])
    assert pids and os.getpid() not in pids  # computed in the cluster's worker processes
    for pid in pids:  # and the cluster is gone with the flow
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize("value", ["ray", "dask:", "dask:8786", "dask:tcp://scheduler", "Dask"])
def test_unknown_task_runners_are_refused_by_key(value: str) -> None:
    with pytest.raises(ConfigError, match=r"run\.task_runner: expected local, dask or dask:tcp"):
        build_config({"run": {"task_runner": value}})


def test_accepted_task_runners_survive_the_json_round_trip() -> None:
    for value in ("local", "dask", "dask:tcp://scheduler:8786", "dask:tcp://10.0.0.5:8786"):
        cfg = build_config({"run": {"task_runner": value}})
        assert PipelineConfig.model_validate(cfg.model_dump(mode="json")) == cfg


def test_the_local_runner_never_imports_dask() -> None:
    code = (
        "import sys, flows.cli, flows.transfer\n"
        "from components.common.config import RunConfig\n"
        "from tasks.common.sharding import open_shards\n"
        "with open_shards(RunConfig()) as shards:\n"
        "    assert shards is None\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('dask', 'distributed', 'prefect_dask')))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    with open_shards(build_config().run) as shards:
        assert shards is None
