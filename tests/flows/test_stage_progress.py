"""A real flow run, without a TTY: progress as bounded plain lines, and in Prefect as artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)

from components.common.config import build_config
from flows.transfer import plan_flow

pytestmark = pytest.mark.slow


def test_the_stages_publish_progress_and_write_plain_lines(
    digits_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    cfg = build_config(
        {
            "output_dir": str(tmp_path / "out"),
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            "similarity": {"sample_size": 32, "bootstrap_rounds": 50},
            "train": {"num_workers": 0},
            "strategy": {"verify": "off"},
        }
    )
    state = plan_flow(data=str(digits_root), config=cfg, return_state=True)
    assert state.is_completed()

    keys = ["similarity-progress", "embed-progress", "resolution-progress"]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=keys),
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            )
        )
    assert {a.key: (a.type, a.data) for a in found} == {k: ("progress", 100) for k in keys}

    err = capsys.readouterr().err
    assert "\r" not in err  # no bar redraws in a log
    finals = [line for line in err.splitlines() if "100% (" in line and "done in" in line]
    assert any(line.startswith("embedding ") for line in finals)
    progress_lines = [line for line in err.splitlines() if " images: " in line]
    assert len(progress_lines) <= 12 * len(finals)  # a tenth at a time, not a line per batch
