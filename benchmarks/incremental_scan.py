"""Time a cold scan, a warm rescan, and a rescan after 5% new files, on a copy of a data folder.

    python benchmarks/incremental_scan.py --data /path/to/mnist/train \
        --json benchmarks/results/incremental_scan_mnist.json

The folder is copied into a temporary folder first, so the files added for the third scan never
touch the original. Without ``--data`` a folder of small PNGs is made for the run. Each scan's
manifest is compared with a scan that uses no cache at all for the last state, so the figures
are for the same output.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from report import machine, write_result

from components.common.config import DataConfig, ValidationConfig
from components.data import scan_cache
from components.data.scan import scan_folder


def make_folder(root: Path, n: int, classes: int = 10) -> Path:
    """``n`` 28x28 greyscale PNGs in ``classes`` class folders (MNIST's shape and size)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / str(i % classes) / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(path)
    return root


def add_copies(root: Path, fraction: float) -> int:
    """Copy ``fraction`` of the images beside themselves under new names (new files to read)."""
    files = sorted(p for p in root.rglob("*.png"))
    chosen = files[:: max(1, round(1 / fraction))]
    for p in chosen:
        shutil.copyfile(p, p.with_name(f"copy-{p.name}"))
    return len(chosen)


def timed_scan(root: Path, cache: Path | None) -> tuple[float, str, int, int]:
    start = time.perf_counter()
    result = scan_folder(root, DataConfig(), ValidationConfig(), seed=0, cache_path=cache)
    seconds = time.perf_counter() - start
    return seconds, result.manifest.to_csv(index=False), result.from_cache, len(result.manifest)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, help="a labelled folder (default: one made here)")
    parser.add_argument("--make", type=int, default=5000, help="images to make without --data")
    parser.add_argument("--fraction", type=float, default=0.05, help="share of new copies")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="incremental-scan-") as tmp:
        work = Path(tmp) / "data"
        start = time.perf_counter()
        if args.data is not None:
            shutil.copytree(args.data, work)
            source = str(args.data)
        else:
            make_folder(work, args.make)
            source = f"made: {args.make} random 28x28 PNGs"
        prepared = time.perf_counter() - start
        cache = scan_cache.cache_file(Path(tmp) / "cache", work)
        scans: dict[str, Any] = {}
        for name in ("cold", "warm"):
            seconds, manifest, hits, n = timed_scan(work, cache)
            scans[name] = {"seconds": round(seconds, 3), "files": n, "from_cache": hits}
            print(f"{name}: {n} files in {seconds:.2f} s ({hits} from the cache)")
        added = add_copies(work, args.fraction)
        seconds, manifest, hits, n = timed_scan(work, cache)
        scans["after_adding"] = {
            "seconds": round(seconds, 3),
            "files": n,
            "from_cache": hits,
            "added": added,
        }
        print(f"after adding {added}: {n} files in {seconds:.2f} s ({hits} from the cache)")
        uncached_seconds, uncached, _, _ = timed_scan(work, None)
        same = uncached == manifest
        print(f"no cache: {n} files in {uncached_seconds:.2f} s; same manifest: {same}")
        scans["no_cache"] = {"seconds": round(uncached_seconds, 3), "files": n}
    result = {
        "benchmark": "incremental_scan",
        "data": source,
        "copy_seconds": round(prepared, 3),
        "scans": scans,
        "same_manifest_as_uncached": same,
        "machine": machine(),
    }
    write_result(result, args.json)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
