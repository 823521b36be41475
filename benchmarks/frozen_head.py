"""The frozen head against scikit-learn's ``LogisticRegressionCV`` on the same features and split.

    python benchmarks/frozen_head.py --data path/to/tf_flowers [--per-class 200] \
        [--image-size 224] --json benchmarks/results/frozen_head_tf_flowers.json

Images are labelled by their parent folder (any layout: ``ROOT/<cls>/*`` or
``ROOT/<split>/<cls>/*``), the first ``--per-class`` files of each class by name are taken, and
one stratified 70/30 split is made. Pooled features at every cut point come from the pipeline's
extraction engine (cached under ``--cache``). For each cut the pipeline's head
(``training.logistic.fit_logistic``: L2 chosen by 5-fold CV on the training rows) is compared with
``LogisticRegressionCV`` (standardised features, its default grid of ten C values, 5 folds) fitted
on the same rows; both are scored on the same test rows, with Wilson 95% intervals and the time
each fit took. By default that comparison runs at the head and at the cut the probe picks
(``--cuts all`` for every cut).

It also compares the two probes on the training rows: the pipeline's closed-form ridge probe
(``decision.strategy.probe_cuts``) and the first version's (scikit-learn logistic regression at
C=0.5, 3-fold cross-validation, run per cut): their CV accuracy per cut, the cut each picks (the
earliest within noise of the best) and the seconds each took.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
from report import machine, write_result
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold, cross_val_score, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from components.common.config import DataConfig
from components.common.intervals import wilson_interval
from components.decision.strategy import probe_cuts
from components.engine.backbones import load_backbone
from components.engine.extraction import ExtractionEngine
from components.engine.images import Preprocessing
from components.training.logistic import fit_logistic


def labelled_files(root: Path, per_class: int | None) -> tuple[list[str], np.ndarray, list[str]]:
    """Image files under ``root`` labelled by parent folder, the first ``per_class`` of each."""
    extensions = DataConfig().extensions
    by_class: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in extensions and ".ipynb" not in str(path):
            by_class.setdefault(path.parent.name, []).append(path)
    classes = sorted(by_class)
    paths: list[str] = []
    labels: list[int] = []
    for i, name in enumerate(classes):
        chosen = by_class[name][:per_class] if per_class else by_class[name]
        paths += [str(p) for p in chosen]
        labels += [i] * len(chosen)
    return paths, np.array(labels), classes


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def sklearn_cv(x: np.ndarray, y: np.ndarray, seed: int) -> make_pipeline:
    model = make_pipeline(
        StandardScaler(),
        LogisticRegressionCV(
            Cs=10, cv=5, max_iter=1000, l1_ratios=(0.0,), scoring="accuracy", random_state=seed
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)  # sklearn's attribute-layout transition
        model.fit(x, y)
    return model


def first_version_probe(
    features: dict[str, np.ndarray], labels: np.ndarray, seed: int
) -> tuple[dict[str, float], str]:
    """The probe this pipeline used before: sklearn logistic regression, C=0.5, 3-fold CV."""
    splitter = StratifiedKFold(n_splits=3, shuffle=True, random_state=seed)
    means, stds = {}, {}
    for cut, x in features.items():
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=0.5))
        scores = cross_val_score(model, x, labels, cv=splitter)
        means[cut], stds[cut] = float(scores.mean()), float(scores.std())
    best = max(means, key=means.get)
    bar = means[best] - stds[best] / np.sqrt(3)
    return means, next(c for c in means if means[c] >= bar)


def scored(correct: np.ndarray) -> dict[str, float]:
    low, high = wilson_interval(int(correct.sum()), len(correct))
    return {"accuracy": float(correct.mean()), "low": low, "high": high, "n": len(correct)}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--per-class", type=int, help="default: every image")
    parser.add_argument("--image-size", type=int, help="default: the backbone's native size")
    parser.add_argument("--cache", type=Path, default=Path(".bench_cache"))
    parser.add_argument(
        "--cuts", help="comma-separated cut names, or all (default: the head and the probe's pick)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    paths, labels, classes = labelled_files(args.data, args.per_class)
    backbone = load_backbone("efficientnet_lite0")
    native = backbone.preprocessing
    prep = Preprocessing(
        args.image_size or native.image_size,
        native.mean,
        native.std,
        native.crop_pct,
        native.interpolation,
    )
    engine = ExtractionEngine(backbone, args.cache, torch.device("cpu"))
    start = time.perf_counter()
    features = engine.features(paths, [sha256(p) for p in paths], prep)
    embed_seconds = time.perf_counter() - start
    train, test = train_test_split(
        np.arange(len(labels)), test_size=0.3, stratify=labels, random_state=args.seed
    )
    train_features = {cut: x[train] for cut, x in features.items()}
    start = time.perf_counter()
    probe = probe_cuts(train_features, labels[train], args.seed)
    probe_seconds = time.perf_counter() - start
    start = time.perf_counter()
    old_means, old_chosen = first_version_probe(train_features, labels[train], args.seed)
    old_seconds = time.perf_counter() - start
    print(f"{args.data.name}: {len(paths)} images, {len(classes)} classes, {prep.image_size} px")
    print(f"{'cut':>8} {'ridge probe':>12} {'first probe':>12}")
    for cut, mean in zip(probe.cuts, probe.means, strict=True):
        print(f"{cut:>8} {mean:12.4f} {old_means[cut]:12.4f}")
    print(
        f"picked: ridge {probe.chosen} in {probe_seconds:.1f} s, first version {old_chosen} in "
        f"{old_seconds:.1f} s (embedding took {embed_seconds:.1f} s)"
    )
    if args.cuts == "all":
        cuts = list(features)
    elif args.cuts:
        cuts = args.cuts.split(",")
    else:
        cuts = sorted({probe.chosen, "head"}, key=list(features).index)
    rows = []
    print(f"{'cut':>8} {'ours':>7} {'sklearn':>8} {'diff':>6} {'ours s':>7} {'sk s':>6} {'C':>8}")
    for cut in cuts:
        x = features[cut]
        start = time.perf_counter()
        fit, _ = fit_logistic(x[train], labels[train], len(classes), args.seed)
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        reference = sklearn_cv(x[train], labels[train], args.seed)
        sk_s = time.perf_counter() - start
        ours = scored(fit.predict(x[test]) == labels[test])
        theirs = scored(reference.predict(x[test]) == labels[test])
        diff = ours["accuracy"] - theirs["accuracy"]
        rows.append(
            {
                "cut": cut,
                "dims": x.shape[1],
                "ours": ours | {"seconds": ours_s, "C": fit.c, "cv_accuracy": fit.cv_accuracy},
                "sklearn": theirs | {"seconds": sk_s, "C": float(reference[-1].C_[0])},
                "difference": diff,
            }
        )
        print(
            f"{cut:>8} {ours['accuracy']:7.4f} {theirs['accuracy']:8.4f} {100 * diff:+6.1f} "
            f"{ours_s:7.1f} {sk_s:6.1f} {fit.c:8.2g}"
        )
    n_test = len(test)
    print(f"(test n = {n_test}; embedding {embed_seconds:.1f} s; differences in points)")
    result = {
        "dataset": args.data.name,
        "images": len(paths),
        "classes": len(classes),
        "image_size": prep.image_size,
        "n_train": len(train),
        "n_test": n_test,
        "embed_seconds": embed_seconds,
        "cuts": rows,
        "probe": {
            "ridge": dict(zip(probe.cuts, probe.means, strict=True)),
            "ridge_chosen": probe.chosen,
            "ridge_seconds": probe_seconds,
            "first_version": old_means,
            "first_version_chosen": old_chosen,
            "first_version_seconds": old_seconds,
        },
        "worst_difference": min(r["difference"] for r in rows),
        "machine": machine(load=os.getloadavg()),
    }
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
