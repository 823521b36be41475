"""User errors through the real CLI: exit status 2, a short message, no traceback (unless --debug).

The CLI runs as a subprocess (what a user sees on the terminal), except where only its exit
status and message matter; one test runs the real flow so Prefect's own failure logs are covered.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect import flow, task

from components.common.config import build_config
from components.common.errors import ConfigError, DataValidationError
from flows.cli import main
from tasks.common.context import make_context
from tasks.common.logs import RUN_LOGGERS, quiet_user_errors
from tests.conftest import write_photo

REPO = Path(__file__).resolve().parents[2]


def _cli(tmp_path: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONPATH=str(REPO),
    )
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _user_error(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in done.stderr.splitlines() if line.startswith("transfer-pipeline:")]
    assert len(errors) == 1 and errors[0].startswith("transfer-pipeline: error: "), output
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def _dataset(root: Path, classes: tuple[str, ...] = ("cat", "dog")) -> Path:
    for k, label in enumerate(classes):
        for i in range(6):
            write_photo(root / label / f"{i}.png", seed=10 * k + i, size=(24, 24))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _dataset(tmp_path_factory.mktemp("cli") / "pets")


CONFIG_ERRORS = {
    "malformed YAML": (b"train: [\n", (), "is not valid YAML at line 2"),
    "not UTF-8": (b"train:\n  device: caf\xe9\n", (), "is not UTF-8 text (byte 0xe9"),
    "a value where a section is": (
        b"",
        ("--set", "train=5", "--set", "train.device=cpu"),
        "cannot set train.device: train is already set to 5, not a section",
    ),
    "a boolean for a number": (
        b"",
        ("--set", "train.batch_size=true"),
        "train.batch_size: expected a number, not a boolean",
    ),
    "no key": (b"", ("--set", "=3"), "--set expects KEY=VALUE"),
    "unknown key": (b"", ("--set", "train.epochz=3"), "train.epochz"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_config_errors_exit_2_with_a_message(case: str, data: Path, tmp_path: Path) -> None:
    text, extra, expected = CONFIG_ERRORS[case]
    config = tmp_path / "pipeline.yaml"
    config.write_bytes(text)
    _user_error(
        _cli(tmp_path, "plan", "--data", str(data), "--config", str(config), *extra), expected
    )


def test_debug_shows_the_traceback(data: Path, tmp_path: Path) -> None:
    config = tmp_path / "pipeline.yaml"
    config.write_bytes(b"train: [\n")
    done = _cli(tmp_path, "plan", "--data", str(data), "--config", str(config), "--debug")
    assert done.returncode == 2
    assert "Traceback" in done.stderr and "ConfigError" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("transfer-pipeline: error: ")


def test_a_refused_layout_stops_before_prefect_starts(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "mixed" / "train")
    _dataset(tmp_path / "mixed", classes=("bird",))
    done = _cli(tmp_path, "run", "--data", str(root.parent), "--output-dir", str(tmp_path / "o"))
    _user_error(done, "mixes split folders (train/)", "other folders (bird/)", "expected")
    assert "temporary server" not in done.stderr  # refused in a moment, not after the boot
    assert not (tmp_path / "o").exists()  # and nothing written for a run that never started


def test_a_missing_data_folder_is_named(tmp_path: Path) -> None:
    _user_error(
        _cli(tmp_path, "plan", "--data", str(tmp_path / "nowhere")), "nowhere does not exist"
    )


def test_a_data_error_inside_the_flow_prints_no_prefect_traceback(tmp_path: Path) -> None:
    """An empty class folder is found by the scan task, inside a real Prefect flow run."""
    root = _dataset(tmp_path / "pets", classes=("cat",))
    (root / "dog").mkdir()
    (root / "dog" / "notes.txt").write_text("no images yet")
    out = tmp_path / "out"
    done = _cli(tmp_path, "plan", "--data", str(root), "--output-dir", str(out), timeout=300)
    _user_error(done, "class folder(s) dog", "contain no image files")
    assert "Finished in state Failed" in done.stderr  # Prefect still says which run failed
    assert len(done.stderr.splitlines()) < 20, done.stderr


def test_a_bad_model_uri_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["serve-model", "--model-uri", "digits", "--output-dir", str(out)]) == 2
    assert "must look like models:/<name>/<version>" in capsys.readouterr().err
    assert (
        main(["serve-model", "--model-uri", "models:/digits@candidate", "--output-dir", str(out)])
        == 2
    )
    err = capsys.readouterr().err
    assert "no MLflow store at" in err and "Traceback" not in err
    assert not out.exists()  # asking created no empty store


def test_an_output_dir_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"output_dir .*out: cannot create the run folder"):
        make_context(tmp_path, build_config({"output_dir": str(tmp_path / "out")}))


@task
def _scan_like(kind: str) -> None:
    if kind == "user":
        raise DataValidationError("class folder dog is empty")
    raise ZeroDivisionError("a bug in our code")


@flow
def _flow_failing_with(kind: str) -> None:
    _scan_like(kind)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_prefect_keeps_bug_tracebacks_and_drops_user_error_ones() -> None:
    handler = _Records()
    loggers = [logging.getLogger(name) for name in RUN_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with quiet_user_errors():
            with pytest.raises(DataValidationError):
                _flow_failing_with("user")
            with pytest.raises(ZeroDivisionError):
                _flow_failing_with("bug")
        quiet = list(handler.records)
        handler.records.clear()
        with pytest.raises(DataValidationError):
            _flow_failing_with("user")  # outside the block: nothing is filtered any more
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    tracebacks = {type(r.exc_info[1]) for r in quiet if r.exc_info}
    assert tracebacks == {ZeroDivisionError}
    assert any("class folder dog is empty" in r.getMessage() for r in quiet)  # state lines stay
    assert any(
        r.exc_info and isinstance(r.exc_info[1], DataValidationError) for r in handler.records
    )
