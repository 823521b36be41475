"""The CLI boots Prefect's temporary server early, and the flow then uses that same server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import json, threading
from flows.cli import start_prefect_api_early
booting = start_prefect_api_early()
if booting is None:
    print(json.dumps({"started": False}))
else:
    booting.join()
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.server.api.server import SubprocessASGIServer

    @flow
    def where() -> str:
        with get_client(sync_client=True) as client:
            return str(client.api_url)

    early = SubprocessASGIServer().api_url
    print(json.dumps({"started": True, "early": early, "flow": where()}))
"""


def _probe(tmp_path: Path, **env: str) -> dict[str, object]:
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") or k == "PREFECT_HOME"
    }
    environ.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONPATH=str(REPO),
        **env,
    )
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_flow_runs_on_the_server_started_early(tmp_path: Path) -> None:
    result = _probe(tmp_path)
    assert result["started"] is True
    assert str(result["flow"]).rstrip("/") == str(result["early"]).rstrip("/")


def test_a_configured_server_is_left_alone(tmp_path: Path) -> None:
    result = _probe(tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api")
    assert result == {"started": False}
