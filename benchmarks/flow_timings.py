"""Run the whole flow on a folder and write its stage timings (and outcome) as JSON.

    python benchmarks/flow_timings.py --data path/to/hymenoptera_data \
        --json benchmarks/results/hymenoptera_flow.json [--set train.device=cpu] [--repeat 2]

The second repeat shows the warm path: the feature cache makes a rerun on the same data skip the
backbone entirely.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


from report import machine, write_result

from components.common.config import load_config
from flows.transfer import transfer_flow


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
    args = parser.parse_args()
    overrides = {
        k: json.loads(v) if v[:1].isdigit() else v
        for k, _, v in (s.partition("=") for s in args.set)
    }
    with tempfile.TemporaryDirectory(prefix="tp-bench-") as out:
        overrides.setdefault("output_dir", out)
        cfg = load_config(args.config, overrides)
        runs = []
        for i in range(args.repeat):
            start = time.perf_counter()
            summary = transfer_flow(data=str(args.data), config=cfg)
            wall = time.perf_counter() - start
            runs.append(
                {
                    "run": i,
                    "cold": i == 0,
                    "wall_seconds": round(wall, 2),
                    "flow_seconds": summary["seconds"],
                    "stage_seconds": summary["stage_seconds"],
                    "case": summary["case"],
                    "cut": summary["cut"],
                    "metrics": summary["metrics"],
                    "similarity": summary["similarity"]["score"],
                    "device": summary["device"],
                }
            )
            stages = ", ".join(f"{k} {v:.1f}" for k, v in summary["stage_seconds"].items())
            print(
                f"run {i} ({'cold' if i == 0 else 'warm'}): {wall:.1f} s wall; case {summary['case']}; "
                f"val accuracy {summary['metrics']['val_accuracy']:.4f}; stages (s): {stages}"
            )
    result = {
        "dataset": args.data.name,
        "machine": machine(),
        "runs": runs,
    }
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
