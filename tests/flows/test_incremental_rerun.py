"""A rerun after a little new data reuses what the last run measured and trained; --force does not.

Real runs of the CLI's flow on scikit-learn's digits: the verdict of a measured verification
stands for the next run while under 10% of the files changed, and a fine-tune continues from the
last run's weights (one epoch) instead of starting over from the pre-trained ones.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from components.common.config import build_config
from components.common.fingerprint import load_record, record_path
from components.data.demo_data import materialise_digits
from flows.cli import main

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, cache: Path, **sections: dict) -> Path:
    cfg = build_config(
        {
            "output_dir": str(tmp_path / "out"),
            "run": {"cache_dir": str(cache)},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            "similarity": {"sample_size": 32, "bootstrap_rounds": 50},
            **sections,
        }
    )
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    return path


def _cli(*args: str) -> dict:
    """The CLI's ``--json`` summary. stdout alone is redirected, not captured with ``capsys``:
    Prefect's console handler keeps the stderr it first saw, which ``capsys`` would close."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*args, "--json"]) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


def _run(data: Path, cfg_file: Path, *extra: str) -> dict:
    return _cli("run", "--data", str(data), "--config", str(cfg_file), *extra)


def test_a_fine_tune_continues_from_the_last_runs_weights(
    tmp_path: Path, shared_cache: Path
) -> None:
    data = materialise_digits(tmp_path / "digits", per_class=20)
    train = {"num_workers": 0, "finetune_epochs": 1, "image_size": 64}
    cfg_file = _config(tmp_path, shared_cache, train=train, strategy={"case": 3})
    first = _run(data, cfg_file)
    assert first["data_change"] is None
    assert "warm start" not in [a["init"] for a in first["attempts"]]
    record = load_record(record_path(tmp_path / "out", "digits"))
    assert record is not None and record.case == 3 and Path(record.model_path).is_file()

    materialise_digits(data, per_class=21)  # ten new images: 5%
    second = _run(data, cfg_file)
    change = second["data_change"]
    assert change["since_run"] == first["mlflow_run_id"]
    assert (change["added"], change["removed"], change["changed"]) == (10, 0, 0)  # no file moved
    warm = second["attempts"][0]
    assert warm["init"] == "warm start" and warm["from_run"] == first["mlflow_run_id"]
    assert warm["model_path"] == record.model_path and warm["success"] is True
    assert [a["init"] for a in second["attempts"]] == ["warm start"]
    assert second["warm_start"].startswith(f"from run {first['mlflow_run_id']}'s weights")
    assert second["model_version"] == 2
    after = load_record(record_path(tmp_path / "out", "digits"))
    assert after is not None and after.changed_since_full == pytest.approx(0.05)

    forced = _run(data, cfg_file, "--force")  # from scratch: nothing reused
    assert forced["data_change"] is None
    assert [a["init"] for a in forced["attempts"]] == ["frozen probe", "pretrained"]
    assert forced["warm_start"].startswith("from the pre-trained weights")
    latest = load_record(record_path(tmp_path / "out", "digits"))
    assert latest is not None and latest.changed_since_full == 0


def test_a_measured_verdict_stands_while_little_changed(tmp_path: Path, shared_cache: Path) -> None:
    data = materialise_digits(tmp_path / "digits", per_class=20)
    train = {"num_workers": 0, "finetune_epochs": 1, "image_size": 64}
    # a narrow margin: on 29 held-out digits the two cases would otherwise tie, and a tie is
    # measured again, never reused
    strategy = {"verify": "auto", "verify_margin_se": 0.25}
    cfg_file = _config(tmp_path, shared_cache, train=train, strategy=strategy)
    first = _run(data, cfg_file)
    measured = first["verification"]
    assert measured["run"] is True and "inner_accuracy" in measured, measured["reason"]
    assert "reused_from" not in measured and not measured["tie"], measured

    materialise_digits(data, per_class=21)
    planned = _cli("plan", "--data", str(data), "--config", str(cfg_file))
    assert planned["verification"]["reused_from"] == first["mlflow_run_id"]  # says so up front
    assert planned["data_change"]["added"] == 10
    second = _run(data, cfg_file)
    reused = second["verification"]
    assert reused["reused_from"] == first["mlflow_run_id"]
    assert reused["inner_accuracy"] == measured["inner_accuracy"]
    assert second["case"] == measured["chosen_case"]
    assert f"Kept the verdict measured in run {first['mlflow_run_id']}" in second["reason"]
    # nothing was trained for the check: the nested runs' folder exists in the first run only
    assert (Path(first["run_dir"]) / "verification").is_dir()
    assert not (Path(second["run_dir"]) / "verification").exists()
