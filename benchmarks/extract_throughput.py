"""Feature-extraction throughput: the bare forward pass against the whole extraction, per engine.

    python benchmarks/extract_throughput.py --data DIR [--batch-size N] [--json OUT]

(a) Bare forward: the feature graph (every cut point pooled and concatenated) on random tensors, in
eager PyTorch, channels-last PyTorch and ONNX Runtime, after a warm-up. ONNX Runtime is timed both
as one session using every CPU and as one single-threaded stream per CPU (how the extraction runs
it); the faster of the two is its limit. (b) End to end: ``ExtractionEngine.features`` into a
fresh temporary cache root for each engine, on CPU: ONNX Runtime in streams that each decode a
batch and run it, PyTorch fed by loader workers, in batches the engine sizes itself
(``extraction_batch``). The ONNX engine's one-off export is timed apart, as a rerun reuses the
file. (c) Decoding alone, on one core.

``--batch-size`` sets the bare forward's and the decoding's batch only: the engine always batches
as the pipeline does, so with another size the ratios compare different batches.

The ratio end-to-end / bare forward of the same engine says how much of the engine's speed survives
decoding. Decoding needs CPU time too, so on a CPU the ratio cannot exceed the engine's share of the
total work, printed as the ceiling. Each figure is the best of ``--repeat`` interleaved runs, since
other work on the machine can only slow a run down.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would garble the table

import numpy as np
import torch
from report import machine, write_result

from components.common.config import DataConfig
from components.engine.backbones import Backbone, load_backbone
from components.engine.cache import cache_key
from components.engine.extraction import (
    FEATURES,
    NUM_WORKERS,
    ExtractionEngine,
    extraction_batch,
)
from components.engine.images import Preprocessing, decode_batch
from components.engine.onnx_graphs import (
    INPUT_NAME,
    available_cpus,
    cached_graph,
    cpu_eval_copy,
    feature_session,
)
from components.engine.passes import PooledFeatureStack

OUTPUT_NAME = FEATURES.output_name

CPU = torch.device("cpu")


def _rate(step: Callable[[], None], batch: int, min_images: int) -> float:
    step()  # warm-up: allocations, ORT's first-run planning, oneDNN primitive caches
    step()
    done, start = 0, time.perf_counter()
    while done < min_images:
        step()
        done += batch
    return done / (time.perf_counter() - start)


def bare_forward(
    wrapper: PooledFeatureStack, onnx_path: Path, batch: int, size: int, min_images: int
) -> dict[str, float]:
    """Images/s of the same feature graph on one random batch, per engine."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    channels_last = copy.deepcopy(wrapper).to(memory_format=torch.channels_last)
    session = feature_session(onnx_path, CPU)
    streams = available_cpus()
    single = feature_session(onnx_path, CPU, threads=1)
    pool = ThreadPoolExecutor(streams)
    x_np = x.numpy()

    @torch.inference_mode()
    def eager() -> None:
        wrapper(x)

    @torch.inference_mode()
    def cl() -> None:
        channels_last(x_cl)

    def ort() -> None:
        session.run([OUTPUT_NAME], {INPUT_NAME: x_np})

    def ort_streams() -> None:  # one batch per stream, all at once
        list(pool.map(lambda _: single.run([OUTPUT_NAME], {INPUT_NAME: x_np}), range(streams)))

    with pool:
        return {
            "torch_eager": _rate(eager, batch, min_images),
            "torch_channels_last": _rate(cl, batch, min_images),
            "onnxruntime": _rate(ort, batch, min_images),
            "onnxruntime_streams": _rate(ort_streams, batch * streams, min_images),
        }


def decode_rate(paths: list[str], prep: Preprocessing, batch: int) -> float:
    """Images/s of decoding files into normalised batches on one thread, as one stream does."""
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        decode_batch(paths[i : i + batch], prep)
    return len(paths) / (time.perf_counter() - start)


def end_to_end(
    backbone: Backbone,
    paths: list[str],
    shas: list[str],
    prep: Preprocessing,
    engine: str,
    workers: int,
    onnx_path: Path,
) -> tuple[float, np.ndarray]:
    """Images/s of ``ExtractionEngine.features`` from files to a filled, fresh cache, and its rows.

    The engine is built before the clock starts, as a flow run builds it once for every stage; its
    ONNX Runtime session is opened inside the timed call, as on a run's first extraction.
    """
    with tempfile.TemporaryDirectory(prefix="tp-extract-") as root:
        if engine == "onnxruntime":  # the exported graph is reused, as on every run after the first
            folder = Path(root) / cache_key(backbone, prep)
            folder.mkdir()
            shutil.copyfile(onnx_path, folder / FEATURES.file_name)
        extractor = ExtractionEngine(backbone, Path(root), CPU, engine, num_workers=workers)
        start = time.perf_counter()
        feats = extractor.features(paths, shas, prep)
        seconds = time.perf_counter() - start
    return len(paths) / seconds, np.concatenate(list(feats.values()), axis=1)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, type=Path, help="a folder of images (any depth)")
    parser.add_argument(
        "--batch-size",
        type=int,
        help="bare forward and decoding batch (default: the pipeline's for the size, which the "
        "end-to-end runs always use)",
    )
    parser.add_argument("--num-workers", type=int, default=NUM_WORKERS)
    parser.add_argument("--image-size", type=int, help="default: the backbone's native size")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is kept")
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args()

    backbone = load_backbone(args.backbone)
    prep = backbone.preprocessing
    if args.image_size:
        prep = Preprocessing(
            args.image_size, prep.mean, prep.std, prep.crop_pct, prep.interpolation
        )
    engine_batch = extraction_batch(prep.image_size, CPU)  # what ExtractionEngine batches by
    batch = args.batch_size or engine_batch
    extensions = DataConfig().extensions
    paths = sorted(str(p) for p in args.data.rglob("*") if p.suffix.lower() in extensions)
    if not paths:
        parser.error(f"no images under {args.data}")
    shas = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="tp-graph-") as graph_dir:
        start = time.perf_counter()
        onnx_path = cached_graph(
            PooledFeatureStack(cpu_eval_copy(backbone.model)).eval(),
            prep.image_size,
            Path(graph_dir) / FEATURES.file_name,
            OUTPUT_NAME,
        )
        export_seconds = time.perf_counter() - start
        wrapper = PooledFeatureStack(backbone.model).eval()
        runs: dict[str, list[float]] = {}
        rows: dict[str, np.ndarray] = {}
        for _ in range(args.repeat):  # interleaved, so a busy spell hits every figure alike
            for name, rate in bare_forward(
                wrapper, onnx_path, batch, prep.image_size, max(256, 4 * batch)
            ).items():
                runs.setdefault(f"bare/{name}", []).append(rate)
            for engine in ("onnxruntime", "torch"):
                rate, rows[engine] = end_to_end(
                    backbone,
                    paths,
                    shas,
                    prep,
                    engine,
                    args.num_workers,
                    onnx_path,
                )
                runs.setdefault(f"end_to_end/{engine}", []).append(rate)
            runs.setdefault("decode_one_core", []).append(decode_rate(paths, prep, batch))

    best = {k: round(max(v), 1) for k, v in runs.items()}
    best["bare/onnxruntime_best"] = max(best["bare/onnxruntime"], best["bare/onnxruntime_streams"])
    ratios = {
        "onnxruntime": round(best["end_to_end/onnxruntime"] / best["bare/onnxruntime_best"], 3),
        "torch": round(best["end_to_end/torch"] / best["bare/torch_channels_last"], 3),
    }
    cpus = available_cpus()
    ceilings = {  # engine CPU time / (engine CPU time + decoding CPU time), per image
        engine: round((cpus / best[bare]) / (cpus / best[bare] + 1 / best["decode_one_core"]), 3)
        for engine, bare in (
            ("onnxruntime", "bare/onnxruntime_best"),
            ("torch", "bare/torch_channels_last"),
        )
    }
    engines_diff = float(np.max(np.abs(rows["onnxruntime"] - rows["torch"])))
    print(
        f"{len(paths)} images, {prep.image_size} px, batch {batch}, "
        f"{available_cpus()} CPUs, {args.num_workers} loader workers for PyTorch "
        f"(images/s, best of {args.repeat})"
    )
    print(f"{'engine':<22}{'bare forward':>14}{'end to end':>12}{'ratio':>8}{'ceiling':>9}")
    print(f"{'torch eager':<22}{best['bare/torch_eager']:>14.1f}")
    print(
        f"{'torch channels-last':<22}{best['bare/torch_channels_last']:>14.1f}"
        f"{best['end_to_end/torch']:>12.1f}{ratios['torch']:>8.2f}{ceilings['torch']:>9.2f}"
    )
    print(f"{'onnxruntime, 1 session':<22}{best['bare/onnxruntime']:>14.1f}")
    print(
        f"{'onnxruntime, streams':<22}{best['bare/onnxruntime_streams']:>14.1f}"
        f"{best['end_to_end/onnxruntime']:>12.1f}{ratios['onnxruntime']:>8.2f}"
        f"{ceilings['onnxruntime']:>9.2f}"
    )
    print("(the ONNX Runtime ratio is against the faster of its two bare figures)")
    if batch != engine_batch:
        print(f"(end to end ran in the engine's batches of {engine_batch}, not {batch})")
    print(f"decoding + transform alone, one core: {best['decode_one_core']:.1f} images/s")
    print(f"one-off ONNX export and parity check: {export_seconds:.1f} s")
    print(f"largest |difference| between the engines' cached features: {engines_diff:.2e}")

    result = {
        "dataset": args.data.resolve().name,
        "images": len(paths),
        "backbone": backbone.name,
        "image_size": prep.image_size,
        "batch_size": batch,
        "num_workers": args.num_workers,
        "repeat": args.repeat,
        "images_per_second": best,
        "all_runs": {k: [round(r, 1) for r in v] for k, v in runs.items()},
        "ratio_end_to_end_over_bare": ratios,
        "ratio_ceiling": ceilings,
        "max_abs_diff_between_engines": engines_diff,
        "export_seconds": round(export_seconds, 1),
        "machine": machine(
            load_average_before=round(load_before, 2),
            load_average_after=round(os.getloadavg()[0], 2),
        ),
    }
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
