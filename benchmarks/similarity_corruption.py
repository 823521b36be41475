"""The similarity score under graded corruption: it must fall as blur, noise or colour loss grows.

Corrupted copies of a sample of the images are written to a temporary folder (the originals are
never touched) and scored at severities 0 (clean) to 5; the Spearman correlation between severity
and score is reported per corruption (the test suite asks for <= -0.9 on its shipped sample).

    python benchmarks/similarity_corruption.py --data DIR [--sample 128] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scipy.stats import spearmanr

from components.common.config import DataConfig, SimilarityConfig, ValidationConfig
from components.data.scan import scan_dataset
from components.engine.backbones import load_backbone
from components.engine.extraction import ExtractionEngine
from components.similarity.corruptions import CORRUPTIONS, SEVERITIES, write_corrupted
from components.similarity.scores import sample_rows, score_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--sample", type=int, default=128)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    manifest = scan_dataset(args.data, DataConfig(), ValidationConfig(), 0)
    paths = manifest[manifest["decodable"]]["path"].tolist()
    cfg = SimilarityConfig(sample_size=args.sample, bootstrap_rounds=100)
    paths = [paths[i] for i in sample_rows(len(paths), cfg, 0)]
    backbone = load_backbone("efficientnet_lite0")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        # One engine for every severity, as one flow run has one: rows are keyed by file content,
        # so the clean copies (severity 0 of every corruption) are computed once.
        engine = ExtractionEngine(
            backbone, Path(tmp) / "cache", num_workers=0, moments_batch_size=cfg.batch_size
        )
        for kind in CORRUPTIONS:
            rows = []
            for severity in range(SEVERITIES + 1):
                files = write_corrupted(paths, kind, severity, Path(tmp) / f"{kind}{severity}")
                report = score_files(engine, files, cfg, 0)
                rows.append(
                    {
                        "severity": severity,
                        "score": round(report.score, 4),
                        "low": round(report.low, 4),
                        "high": round(report.high, 4),
                        "mean_kl": round(report.mean_kl, 4),
                    }
                )
                print(kind, rows[-1], flush=True)
            rho = spearmanr([r["severity"] for r in rows], [r["score"] for r in rows]).statistic
            results[kind] = {"spearman": round(float(rho), 4), "severities": rows}
            print(f"{kind}: Spearman {rho:.3f}", flush=True)
    out = {"data": str(args.data), "n_images": len(paths), "corruptions": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
