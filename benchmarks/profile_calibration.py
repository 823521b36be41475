"""Reference points for the domain-profile score: MMD² and Fréchet distance between datasets.

A profile is built from one image folder (as a trained model would store it) and fresh samples of
other folders are compared with it. Same-domain pairs should sit near zero, cross-domain pairs far
away; ``similarity.mmd_scale`` is chosen between them (docs/decisions.md).

    python benchmarks/profile_calibration.py --pair REF NEW SIZE [--pair ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from components.common.config import DataConfig, SimilarityConfig, ValidationConfig
from components.data.scan import scan_dataset
from components.engine.backbones import load_backbone
from components.engine.extraction import ExtractionEngine
from components.engine.images import Preprocessing
from components.similarity.domain_profile import PROFILE_CUT, build_profile, compare_to_profile


def _embed(folder: Path, size: int, cache: Path, limit: int, seed: int) -> tuple[np.ndarray, list]:
    manifest = scan_dataset(folder, DataConfig(), ValidationConfig(), seed)
    manifest = manifest[manifest["decodable"]]
    if len(manifest) > limit:
        manifest = manifest.sample(limit, random_state=seed)
    backbone = load_backbone("efficientnet_lite0")
    prep = Preprocessing(size, (0.5,) * 3, (0.5,) * 3)
    engine = ExtractionEngine(backbone, cache)
    feats = engine.features(manifest["path"].tolist(), manifest["sha256"].tolist(), prep)
    return feats[PROFILE_CUT], manifest["label"].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", nargs=3, action="append", metavar=("REF", "NEW", "SIZE"))
    parser.add_argument("--profile-images", type=int, default=2000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cfg = SimilarityConfig()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ref, new, size in args.pair:
            ref_x, ref_labels = _embed(Path(ref), int(size), Path(tmp), args.profile_images, 0)
            profile = build_profile(
                ref_x, ref_labels, "efficientnet_lite0", None, int(size), (), (), (), 0
            )
            new_x, _ = _embed(Path(new), int(size), Path(tmp), cfg.sample_size, 1)
            rng = np.random.default_rng(0)
            resamples = [rng.choice(len(new_x), len(new_x)) for _ in range(50)]
            cmp = compare_to_profile(new_x, profile, cfg.mmd_scale, resamples)
            row = {
                "reference": ref,
                "new": new,
                "image_size": int(size),
                "n_profile": profile.n_images,
                "n_new": len(new_x),
                "mmd2": round(cmp.mmd2, 5),
                "frechet_per_dim": round(cmp.frechet_per_dim, 4),
                "score": round(cmp.score, 4),
                "score_5_95": [round(float(np.percentile(cmp.boot_scores, q)), 4) for q in (5, 95)],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"mmd_scale": cfg.mmd_scale, "pairs": rows}, indent=1))


if __name__ == "__main__":
    main()
