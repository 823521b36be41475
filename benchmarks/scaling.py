"""How each stage of ``plan`` grows with the data: MNIST subsets, cold then warm.

    python benchmarks/scaling.py --data /path/to/mnist --sizes 1000 10000 60000 \
        --json benchmarks/results/scaling_mnist.json

Each size takes the first N/classes images of every class (``--data``'s ``train/`` when it has
one) as links in a temporary folder, and runs ``plan`` twice on one fresh output folder: cold
(nothing cached) and warm (the scan and feature caches filled by the cold run). The growth
exponent of a stage between two sizes is log(t2/t1)/log(n2/n1): 1 is linear.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import itertools

from report import machine, write_result
from subsets import class_files, link_range

from components.common.config import load_config
from flows.cli import start_prefect_api_early
from flows.transfer import plan_flow


def growth(small: dict[str, Any], large: dict[str, Any], phase: str) -> dict[str, float]:
    """Per-stage growth exponents between two sizes (stages under 0.05 s are noise, left out)."""
    ratio = math.log(large["images"] / small["images"])
    a, b = small[phase]["stage_seconds"], large[phase]["stage_seconds"]
    return {
        k: round(math.log(b[k] / a[k]) / ratio, 2) for k in a if k in b and min(a[k], b[k]) >= 0.05
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 60000])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if (booting := start_prefect_api_early()) is not None:
        booting.join()
    files = class_files(args.data)
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="tp-scaling-") as tmp:
            data = Path(tmp) / f"mnist-{size}"
            n = link_range(files, data, 0, size // len(files))
            cfg = load_config(
                None, {"output_dir": str(Path(tmp) / "out"), "data.follow_external_links": True}
            )
            row: dict[str, Any] = {"images": n, "load_before": os.getloadavg()[0]}
            for phase in ("cold", "warm"):
                start = time.perf_counter()
                summary = plan_flow(data=str(data), config=cfg)
                row[phase] = {
                    "wall_seconds": round(time.perf_counter() - start, 2),
                    "stage_seconds": summary["stage_seconds"],
                    "case": summary["case"],
                    "image_size": summary["image_size"],
                }
                stages = ", ".join(f"{k} {v:.2f}" for k, v in summary["stage_seconds"].items())
                print(f"{n} images, {phase}: {row[phase]['wall_seconds']} s; {stages}", flush=True)
            rows.append(row)
    exponents = [
        {
            "from": a["images"],
            "to": b["images"],
            "cold": growth(a, b, "cold"),
            "warm": growth(a, b, "warm"),
        }
        for a, b in itertools.pairwise(rows)
    ]
    for e in exponents:
        print(f"growth {e['from']} -> {e['to']}: cold {e['cold']}; warm {e['warm']}")
    write_result({"machine": machine(), "sizes": rows, "growth": exponents}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
