"""A rerun on unchanged data, configuration and backbone stops early; ``--force`` runs anyway."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from components.common.config import build_config
from components.common.fingerprint import load_record, record_path
from components.data.demo_data import materialise_digits
from flows.cli import main

pytestmark = pytest.mark.slow


def _run(data: Path, cfg_file: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    code = main(["run", "--data", str(data), "--config", str(cfg_file), "--json", *extra])
    assert code == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_an_unchanged_rerun_is_skipped_and_force_runs_it(
    digits_root: Path, tmp_path: Path, shared_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "digits"
    shutil.copytree(digits_root, data)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = build_config(
        {
            "output_dir": str(tmp_path / "out"),
            "run": {"cache_dir": str(shared_cache)},  # changes no fingerprint
            "tracking": {"tracking_uri": uri},
            "similarity": {"sample_size": 32, "bootstrap_rounds": 50},
            "train": {"num_workers": 0},
            "strategy": {"verify": "off", "case": 1},
        }
    )
    cfg_file = tmp_path / "pipeline.yaml"
    cfg_file.write_text(json.dumps(cfg.model_dump(mode="json")))

    first = _run(data, cfg_file, capsys)
    assert first["skipped"] is False and first["model_version"] == 1
    record = load_record(record_path(cfg.output_dir, "digits"))
    assert record is not None and record.mlflow_run_id == first["mlflow_run_id"]
    assert record.fingerprint == first["fingerprint"]

    # the cache lives where run.cache_dir says, and where it lives changes no fingerprint
    assert any(shared_cache.rglob("chunk-*")) and not (tmp_path / "out" / "cache").exists()
    again = _run(data, cfg_file, capsys, "--set", f"run.cache_dir={tmp_path / 'elsewhere'}")
    assert again["skipped"] is True and again["mlflow_run_id"] == first["mlflow_run_id"]
    assert again["fingerprint"] == first["fingerprint"]
    assert f"unchanged since run {first['mlflow_run_id']}" in again["reason"]
    assert "train" not in again["stage_seconds"] and "embed" not in again["stage_seconds"]
    client = MlflowClient(tracking_uri=uri)
    assert [int(v.version) for v in client.search_model_versions("name='digits'")] == [1]

    forced = _run(data, cfg_file, capsys, "--force")
    assert forced["skipped"] is False and forced["model_version"] == 2
    assert forced["fingerprint"] == first["fingerprint"]
    # the forced run is now the one an unchanged rerun is measured against
    latest = load_record(record_path(cfg.output_dir, "digits"))
    assert latest is not None and latest.mlflow_run_id == forced["mlflow_run_id"]

    # new images are other data: the run goes ahead (and the scan reads only those files); a
    # byte-identical copy would not be, being set aside as a duplicate
    materialise_digits(data, per_class=41)
    changed = _run(data, cfg_file, capsys)
    assert changed["skipped"] is False and changed["model_version"] == 3
    assert changed["fingerprint"] != first["fingerprint"]
