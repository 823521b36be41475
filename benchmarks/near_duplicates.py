"""Near-duplicate detection: recall on altered copies, false alarms on distinct images.

From each class, ``--per-class`` images go to train and three copies of each to val: re-encoded
as JPEG quality 70, resized to half size, and cropped to the central 90%; ``--distinct`` other
images of the same class go to val as they are. The folder is written to a temporary directory (the
data is never touched), scanned, embedded at the backbone's native preprocessing and searched with
the configured thresholds. Recall is per kind of copy (its pair with its original confirmed);
precision is over every confirmed pair (a pair of two copies of one original counts as right). The
cosine and hash distance of each copy to its original, and of each distinct image to its nearest
training image, are summarised so thresholds can be set from them.

    python benchmarks/near_duplicates.py --data DIR [--per-class 40] [--distinct 40] [--json OUT]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from benchmarks.report import machine, write_result
from components.common.config import DataConfig, ValidationConfig
from components.data.near_duplicates import find_near_duplicates, perceptual_hash
from components.data.scan import scan_dataset
from components.engine.backbones import load_backbone
from components.engine.extraction import ExtractionEngine
from components.engine.images import open_image

KINDS = ("q70", "resized", "cropped")


def _copy(src: str, kind: str, dst: Path) -> None:
    img = open_image(src)
    if kind == "resized":
        img = img.resize(
            (max(1, img.width // 2), max(1, img.height // 2)), Image.Resampling.BICUBIC
        )
    elif kind == "cropped":
        dx, dy = round(img.width * 0.05), round(img.height * 0.05)
        img = img.crop((dx, dy, img.width - dx, img.height - dy))
    img.save(dst, format="JPEG", quality=70 if kind == "q70" else 90)


def build(
    data: Path, root: Path, per_class: int, distinct: int, sources: dict[str, str]
) -> dict[str, tuple[str, str]]:
    """Write the benchmark folder; returns val file name -> (kind, original's train path), and
    fills ``sources`` (written file -> the data file it came from)."""
    manifest = scan_dataset(data, DataConfig(), ValidationConfig(), 0)
    manifest = manifest[manifest["decodable"]].sort_values("relpath")
    truth: dict[str, tuple[str, str]] = {}
    rng = np.random.default_rng(0)
    for label, group in manifest.groupby("label"):
        paths = group["path"].tolist()
        picked = rng.permutation(len(paths))[: per_class + distinct]
        (root / "train" / label).mkdir(parents=True)
        (root / "val" / label).mkdir(parents=True)
        for n, index in enumerate(picked):
            src = paths[index]
            if n < per_class:
                orig = root / "train" / label / f"{n:04d}.jpg"
                open_image(src).save(orig, format="JPEG", quality=95)
                sources[str(orig)] = src
                for kind in KINDS:
                    name = f"{n:04d}_{kind}.jpg"
                    _copy(str(orig), kind, root / "val" / label / name)
                    truth[f"{label}/{name}"] = (kind, str(orig))
            else:
                name = f"{n:04d}_distinct.jpg"
                open_image(src).save(root / "val" / label / name, format="JPEG", quality=95)
                sources[str(root / "val" / label / name)] = src
                truth[f"{label}/{name}"] = ("distinct", "")
    return truth


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    q = np.quantile(values, [0.0, 0.05, 0.5, 0.95, 1.0])
    return dict(
        zip(("min", "p5", "median", "p95", "max"), (round(float(v), 4) for v in q), strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--distinct", type=int, default=40)
    parser.add_argument("--min-cosine", type=float, help="default: the configured one")
    parser.add_argument("--max-distance", type=int, help="default: the configured one")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    overrides = {
        "near_duplicate_min_cosine": args.min_cosine,
        "near_duplicate_max_distance": args.max_distance,
    }
    cfg = ValidationConfig(**{k: v for k, v in overrides.items() if v is not None})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        sources: dict[str, str] = {}
        truth = build(args.data, root, args.per_class, args.distinct, sources)
        manifest = scan_dataset(root, DataConfig(), cfg, 0).reset_index(drop=True)
        backbone = load_backbone("efficientnet_lite0")
        engine = ExtractionEngine(backbone, Path(tmp) / "cache", num_workers=0)
        start = time.perf_counter()
        features = engine.features(
            manifest["path"].tolist(), manifest["sha256"].tolist(), engine.native
        )[backbone.cut_points[-1]]
        embed_s = time.perf_counter() - start
        start = time.perf_counter()
        found = find_near_duplicates(manifest, features, cfg)
        search_s = time.perf_counter() - start

        by_path = dict(zip(manifest["path"], manifest["relpath"], strict=True))
        origin = {}  # val path -> its original's train path ("" for distinct)
        kind_of = {}
        for path, rel in by_path.items():
            key = rel.removeprefix("val/")
            if key in truth:
                kind_of[path], origin[path] = truth[key]

        def source(path: str) -> str:
            return origin.get(path) or path

        confirmed = {(p.first, p.second) for p in found.pairs}
        right = sum(1 for a, b in confirmed if source(a) == source(b) and source(a))
        # Confirmed pairs of two different data files: false alarms, or copies the data holds.
        unexpected = [
            {
                "first": str(
                    Path(sources.get(source(p.first), p.first)).relative_to(args.data.resolve())
                ),
                "second": str(
                    Path(sources.get(source(p.second), p.second)).relative_to(args.data.resolve())
                ),
                "cosine": p.cosine,
                "distance": p.distance,
            }
            for p in found.pairs
            if source(p.first) != source(p.second)
        ]
        table: dict[str, dict[str, Any]] = {}
        x = features.astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        row = {p: i for i, p in enumerate(manifest["path"])}
        train = [p for p in manifest["path"] if p not in kind_of]
        train_rows = np.array([row[p] for p in train])
        for kind in (*KINDS, "distinct"):
            files = [p for p, k in kind_of.items() if k == kind]
            cosines, distances, flagged = [], [], 0
            for path in files:
                if kind == "distinct":
                    sims = x[train_rows] @ x[row[path]]
                    other = train[int(np.argmax(sims))]
                    flagged += any(path in pair for pair in confirmed)
                else:
                    other = origin[path]
                    flagged += (other, path) in confirmed
                cosines.append(float(x[row[other]] @ x[row[path]]))
                distances.append(
                    float(
                        perceptual_hash(other, cfg.near_duplicate_hash)
                        - perceptual_hash(path, cfg.near_duplicate_hash)
                    )
                )
            table[kind] = {
                "n": len(files),
                "flagged": flagged,
                "rate": round(flagged / max(1, len(files)), 4),
                "cosine": _quantiles(cosines),
                "hash_distance": _quantiles(distances),
            }
    copies = sum(table[k]["n"] for k in KINDS)
    caught = sum(table[k]["flagged"] for k in KINDS)
    result = {
        "data": str(args.data),
        "images": len(manifest),
        "config": {k: v for k, v in cfg.model_dump().items() if k.startswith("near_duplicate")},
        "candidates": found.n_candidates,
        "confirmed_pairs": len(found.pairs),
        "precision": round(right / max(1, len(confirmed)), 4),
        "recall": round(caught / max(1, copies), 4),
        "quarantined": len(found.quarantined),
        "unexpected_pairs": unexpected,
        "embed_seconds": round(embed_s, 2),
        "search_seconds": round(search_s, 3),
        "by_kind": table,
        "machine": machine(),
    }
    print(f"{len(manifest)} images, {found.n_candidates} candidates, {len(found.pairs)} confirmed")
    print(f"precision {result['precision']:.3f}, recall {result['recall']:.3f}")
    print(
        f"{'kind':<10}{'n':>6}{'flagged':>9}{'rate':>8}{'cos p5':>9}{'cos med':>9}{'dist med':>10}{'dist p95':>10}"
    )
    for kind, r in table.items():
        print(
            f"{kind:<10}{r['n']:>6}{r['flagged']:>9}{r['rate']:>8.3f}{r['cosine']['p5']:>9.3f}"
            f"{r['cosine']['median']:>9.3f}{r['hash_distance']['median']:>10.1f}{r['hash_distance']['p95']:>10.1f}"
        )
    print(f"embedding {embed_s:.1f} s, search (candidates + hashes) {search_s:.2f} s")
    write_result(result, args.json)


if __name__ == "__main__":
    main()
