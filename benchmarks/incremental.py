"""What a rerun after new data costs, end to end: a first ``run``, then one after adding 5% new
images, for a frozen case and a fine-tuned one.

    python benchmarks/incremental.py --data /path/to/mnist --per-class 200 \
        --json benchmarks/results/incremental_mnist.json

The folder is the first ``--per-class`` images of every class, linked into a temporary folder;
the 5% added are the next images of each class, so the source is never touched. Both runs share
one output folder (scan cache, feature cache, MLflow store), as a scheduled retrain would. The
aim is a second run costing at most 0.3 of the first. A third run on the same data with
``--force`` (nothing reused: verification measured again, fine-tune from the pre-trained weights)
shows what the reuse cost in accuracy, on the same test images.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from report import machine, write_result
from subsets import class_files, link_range

from components.common.config import load_config
from flows.cli import start_prefect_api_early
from flows.transfer import transfer_flow

MODES = {"frozen": {}, "fine-tuned": {"strategy.case": 3}}


def timed_run(data: Path, cfg: Any, force: bool = False) -> dict[str, Any]:
    load = round(os.getloadavg()[0], 2)
    start = time.perf_counter()
    summary = transfer_flow(data=str(data), config=cfg, force=force)
    return {
        "wall_seconds": round(time.perf_counter() - start, 2),
        "stage_seconds": summary["stage_seconds"],
        "case": summary["case"],
        "image_size": summary["image_size"],
        "accuracy": summary["accuracy"],  # val and test, each with n and a 95% interval
        "verification": {
            k: (summary["verification"] or {}).get(k)
            for k in (
                "rule_case",
                "chosen_case",
                "inner_accuracy",
                "margin",
                "raced",
                "reused_from",
            )
        },
        "verification_reused_from": (summary["verification"] or {}).get("reused_from"),
        "trained_as": [a["init"] for a in summary["attempts"]],
        "data_change": summary["data_change"],
        "model_version": summary["model_version"],
        "load_before": load,
    }


def _accuracy(run: dict[str, Any], split: str) -> str:
    a = run["accuracy"].get(split)
    if a is None:
        return f"{split} -"
    return f"{split} {a['value']:.4f} [{a['low']:.3f}, {a['high']:.3f}] n={a['n']}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--added", type=float, default=0.05, help="share of new images")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=sorted(MODES))
    parser.add_argument(
        "--finetune-size", type=int, help="input size of the fine-tuned mode (default: measured)"
    )
    parser.add_argument(
        "--from-scratch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="then rerun on the same data with --force, to compare accuracy with the reusing run",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if (booting := start_prefect_api_early()) is not None:
        booting.join()
    files = class_files(args.data)
    extra = max(1, round(args.per_class * args.added))
    results = {}
    for mode in args.modes:
        with tempfile.TemporaryDirectory(prefix="tp-incremental-") as tmp:
            data = Path(tmp) / "mnist"
            n = link_range(files, data, 0, args.per_class)
            overrides = {"output_dir": str(Path(tmp) / "out"), "data.name": "mnist", **MODES[mode]}
            if mode == "fine-tuned" and args.finetune_size:
                overrides["train.image_size"] = args.finetune_size
            cfg = load_config(None, {**overrides, "data.follow_external_links": True})
            first = timed_run(data, cfg)
            added = link_range(files, data, args.per_class, args.per_class + extra)
            second = timed_run(data, cfg)
            ratio = round(second["wall_seconds"] / first["wall_seconds"], 3)
            results[mode] = {"images": n, "added": added, "first": first, "second": second}
            results[mode]["ratio"] = ratio
            runs = [("first", first), ("second", second)]
            if args.from_scratch:  # what reusing cost in accuracy: the same data, nothing reused
                scratch = results[mode]["from_scratch"] = timed_run(data, cfg, force=True)
                runs.append(("from scratch", scratch))
            print(
                f"{mode}: {n} images, then +{added}: first {first['wall_seconds']} s, "
                f"second {second['wall_seconds']} s, ratio {ratio}",
                flush=True,
            )
            for name, run in runs:
                stages = ", ".join(f"{k} {v:.1f}" for k, v in run["stage_seconds"].items())
                print(
                    f"  {name}: {run['wall_seconds']} s (load {run['load_before']}), case "
                    f"{run['case']} at {run['image_size']} px, trained as {run['trained_as']}, "
                    f"verdict reused from {run['verification_reused_from']}; "
                    f"{_accuracy(run, 'val')}; {_accuracy(run, 'test')}; {stages}",
                    flush=True,
                )
    settings = {"per_class": args.per_class, "finetune_size": args.finetune_size}
    write_result({"machine": machine(), **settings, **results}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
