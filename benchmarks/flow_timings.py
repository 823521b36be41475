"""Run the whole flow on a folder and write its stage timings (and outcome) as JSON.

    python benchmarks/flow_timings.py --data path/to/hymenoptera_data \
        --json benchmarks/results/hymenoptera_flow.json [--flow plan] [--set train.device=cpu]

The second repeat shows the warm path: the feature cache makes a rerun on the same data skip the
backbone's forward passes entirely. Each run also counts how often a backbone was built and how
long the builds took (every registered builder is wrapped for the run), since building one is a
fixed cost a run should pay once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


from report import machine, write_result

from components.common.config import load_config
from components.engine import backbones
from flows.cli import start_prefect_api_early
from flows.transfer import FLOWS


@contextmanager
def counted_backbone_builds() -> Iterator[dict[str, float]]:
    """Count and time every backbone build while the block runs (registered builders only)."""
    tally = {"builds": 0, "seconds": 0.0}
    originals = dict(backbones.BACKBONES)

    def counted(build: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return build(*args, **kwargs)
            finally:
                tally["builds"] += 1
                tally["seconds"] += time.perf_counter() - start

        return wrapper

    backbones.BACKBONES.update({name: counted(build) for name, build in originals.items()})
    try:
        yield tally
    finally:
        backbones.BACKBONES.update(originals)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--json", type=Path, help="write results here")
    parser.add_argument("--config", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs; the first is cold, later ones warm"
    )
    parser.add_argument(
        "--flow", choices=sorted(FLOWS), default="run", help="the whole run, or the plan only"
    )
    args = parser.parse_args()
    # Prefect's own temporary server would outlive a killed benchmark; ours dies with it.
    if (booting := start_prefect_api_early()) is not None:
        booting.join()
    overrides = {
        k: json.loads(v) if v[:1].isdigit() else v
        for k, _, v in (s.partition("=") for s in args.set)
    }
    with tempfile.TemporaryDirectory(prefix="tp-bench-") as out:
        overrides.setdefault("output_dir", out)
        cfg = load_config(args.config, overrides)
        runs = []
        for i in range(args.repeat):
            with counted_backbone_builds() as builds:
                start = time.perf_counter()
                summary = FLOWS[args.flow](data=str(args.data), config=cfg)
                wall = time.perf_counter() - start
            metrics = summary.get("metrics", {})
            runs.append(
                {
                    "run": i,
                    "cold": i == 0,
                    "wall_seconds": round(wall, 2),
                    "flow_seconds": summary["seconds"],
                    "stage_seconds": summary["stage_seconds"],
                    "case": summary["case"],
                    "cut": summary["cut"],
                    "metrics": metrics,
                    "similarity": summary["similarity"]["score"],
                    "image_size": summary["image_size"],
                    "resolution": summary.get("resolution"),
                    "probe": summary.get("probe"),
                    "verification": summary.get("verification"),
                    "device": summary.get("device"),
                    "backbone_builds": builds["builds"],
                    "backbone_build_seconds": round(builds["seconds"], 3),
                }
            )
            stages = ", ".join(f"{k} {v:.2f}" for k, v in summary["stage_seconds"].items())
            accuracy = metrics.get("val_accuracy")
            scored = "" if accuracy is None else f"val accuracy {accuracy:.4f}; "
            print(
                f"run {i} ({'cold' if i == 0 else 'warm'}): {wall:.1f} s wall; case {summary['case']}; "
                f"similarity {summary['similarity']['score']:.4f}; {scored}"
                f"{builds['builds']} backbone builds ({builds['seconds']:.2f} s); stages (s): {stages}"
            )
    result = {
        "dataset": args.data.name,
        "flow": args.flow,
        "machine": machine(),
        "runs": runs,
    }
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
