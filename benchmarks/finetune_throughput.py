"""Fine-tuning throughput (training images/s) and accuracy at the resolution the pipeline picks.

    python benchmarks/finetune_throughput.py --data DIR [--per-class N] [--epochs 2] [--json OUT]

DIR is ``ROOT/<class>/*`` or has ``train/<class>/*``; with ``--per-class N`` a seeded sample of N
files per class (from ``train/`` when there is one) is symlinked into a temp folder, so the source
is never touched. The data is scanned, counted and split by the pipeline's own components, the input
size comes from ``choose_image_size`` (small images are not upsampled to 224 px), and training is
the pipeline's case 3 (``train_case``: linear probe on cached features, then the whole network
fine-tuned). Two throughputs are reported because they answer different questions:

* steps: a fixed number of training steps (forward, backward, optimiser) on batches loaded and
  augmented beforehand: the network's training speed, without data loading or validation;
* fine-tune: epochs x images trained per epoch / the fine-tune's wall time, which also pays for
  decoding, augmentation, the validation pass after every epoch and checkpointing.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from report import machine, write_result
from torch import nn
from torch.utils.data import DataLoader

from components.common.config import DataConfig, TrainConfig, ValidationConfig
from components.common.plan import TransferPlan
from components.data.counting import count_dataset
from components.data.layout import SPLIT_ALIASES
from components.data.scan import scan_dataset
from components.data.splits import SplitData, load_splits
from components.engine.backbones import Backbone, fresh_model, load_backbone
from components.engine.extraction import ExtractionEngine, choose_device
from components.engine.images import EvalTransform, ImageFiles, Preprocessing, train_transform
from components.training.cases import TrainingJob, choose_image_size, train_case
from components.training.finetune import predict_logits, train_step


def make_subset(source: Path, per_class: int, dest: Path, seed: int) -> Path:
    """Symlink a seeded sample of ``per_class`` images per class into ``dest/<class>/``."""
    train = next(
        (
            p
            for p in source.iterdir()
            if p.is_dir() and SPLIT_ALIASES.get(p.name.lower()) == "train"
        ),
        source,
    )
    extensions = DataConfig().extensions
    rng = random.Random(seed)
    for class_dir in sorted(p for p in train.iterdir() if p.is_dir()):
        files = sorted(
            p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in extensions
        )
        target = dest / class_dir.name
        target.mkdir(parents=True)
        for path in rng.sample(files, min(per_class, len(files))):
            (target / path.name).symlink_to(path.resolve())
    return dest


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_training_steps(
    backbone: Backbone,
    train: SplitData,
    num_classes: int,
    prep: Preprocessing,
    cfg: TrainConfig,
    flip: bool,
    device: torch.device,
    steps: int,
    warmup: int = 2,
) -> tuple[dict[str, Any], nn.Module]:
    """Images/s of ``steps`` training steps on real, pre-loaded batches (the fine-tune's own step).

    Returns the figures and the trained model, whose validation pass is timed next.
    """
    loader = DataLoader(
        ImageFiles(train.paths, train.labels.tolist(), train_transform(prep, flip=flip)),
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=cfg.num_workers,
        drop_last=len(train.paths) > cfg.batch_size,
        generator=torch.Generator().manual_seed(0),
    )
    batches = list(itertools.islice(itertools.cycle(loader), warmup + steps))
    model = fresh_model(backbone, num_classes, copy_backbone=True)
    model.to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.finetune_lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    images_seen, start = 0, time.perf_counter()
    for i, (images, labels) in enumerate(batches):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        train_step(model, images, labels, opt, loss_fn, device, use_bf16)
        if i >= warmup:
            images_seen += len(labels)
    _sync(device)
    seconds = time.perf_counter() - start
    stats = {
        "steps": steps,
        "images": images_seen,
        "seconds": round(seconds, 3),
        "images_per_s": round(images_seen / seconds, 1),
        "bf16_autocast": use_bf16,
    }
    return stats, model


def time_validation_pass(
    model: nn.Module, val: SplitData, prep: Preprocessing, cfg: TrainConfig, device: torch.device
) -> dict[str, Any]:
    """One validation pass as the fine-tune runs it after every epoch (loading included)."""
    loader = DataLoader(
        ImageFiles(val.paths, val.labels.tolist(), EvalTransform(prep)),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
    )
    start = time.perf_counter()
    predict_logits(model, loader, device)
    seconds = time.perf_counter() - start
    return {
        "images": len(val.paths),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(val.paths) / seconds, 1),
    }


def benchmark_plan(flip: bool) -> TransferPlan:
    """Case 3 forced; ``similarity`` only decides the flips, as in the flow."""
    return TransferPlan(
        case=3,
        cut=None,
        size="large",
        similarity="similar" if flip else "different",
        uncertain=False,
        reason="case 3 forced by the fine-tune throughput benchmark",
        overridden=True,
        min_images_per_class=0,
        large_images_per_class=0,
        similarity_score=float("nan"),
        similar_threshold=0.5,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--per-class", type=int, help="symlink a sample of N images per class")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    parser.add_argument("--num-workers", type=int, default=TrainConfig().num_workers)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--similar",
        action="store_true",
        help="photo-like data: horizontal flips on, as the flow does for similar data",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args()
    cfg = TrainConfig(
        device=args.device,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        finetune_epochs=args.epochs,
    )
    device = choose_device(cfg.device)
    with tempfile.TemporaryDirectory(prefix="tp-finetune-") as tmp:
        work = Path(tmp)
        root = args.data
        if args.per_class:
            root = make_subset(args.data, args.per_class, work / "data", args.seed)
        manifest = scan_dataset(root, DataConfig(), ValidationConfig(), args.seed)
        manifest = manifest[manifest["decodable"]]
        counts = count_dataset(manifest)
        backbone = load_backbone("efficientnet_lite0")
        native = backbone.preprocessing
        size, reason = choose_image_size(
            cfg.image_size, counts.median_short_side, native.image_size
        )
        prep = Preprocessing(size, native.mean, native.std, native.crop_pct, native.interpolation)
        classes = list(counts.classes)
        start = time.perf_counter()
        engine = ExtractionEngine(backbone, work / "cache", num_workers=cfg.num_workers)
        splits = load_splits(manifest, classes, engine, prep)
        embed_seconds = time.perf_counter() - start
        train, val = splits["train"], splits["val"]
        print(
            f"{len(classes)} classes; train {len(train.paths)}, val {len(val.paths)}; "
            f"image size {reason}",
            flush=True,
        )
        steps, model = time_training_steps(
            backbone, train, len(classes), prep, cfg, args.similar, device, args.steps
        )
        val_pass = time_validation_pass(model, val, prep, cfg, device)
        del model
        print(f"timed {args.steps} steps: {steps['images_per_s']:.1f} images/s", flush=True)
        job = TrainingJob(
            benchmark_plan(args.similar),
            backbone,
            train,
            val,
            classes,
            cfg,
            prep,
            work / "run",
            args.seed,
        )
        result = train_case(job)
    attempt = next(a for a in result.attempts if a["init"] == "pretrained")
    probe = next(a for a in result.attempts if a["init"] == "frozen probe")
    per_epoch = (
        len(train.paths) // cfg.batch_size * cfg.batch_size
        if len(train.paths) > cfg.batch_size
        else len(train.paths)
    )
    epochs_run = len(result.history)
    ft_seconds = float(attempt["seconds"])
    finetune = {
        "epochs": epochs_run,
        "images_per_epoch": per_epoch,
        "seconds": round(ft_seconds, 2),
        "images_per_s": round(epochs_run * per_epoch / ft_seconds, 1),
        "images_per_s_without_val_passes": round(
            epochs_run * per_epoch / max(ft_seconds - epochs_run * val_pass["seconds"], 1e-9), 1
        ),
        "val_accuracy": result.val_accuracy,
        "best_epoch": attempt["best_epoch"] + 1,
        "history": list(result.history),
        "probe_val_accuracy": probe["val_accuracy"],
    }
    out = {
        "dataset": args.data.name,
        "per_class": args.per_class,
        "classes": len(classes),
        "split": {"train": len(train.paths), "val": len(val.paths)},
        "image_size": size,
        "image_size_reason": reason,
        "median_short_side": counts.median_short_side,
        "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers,
        "flips": args.similar,
        "device": str(device),
        "embed_seconds": round(embed_seconds, 2),
        "steps": steps,
        "val_pass": val_pass,
        "finetune": finetune,
        "case_3_total_seconds": round(result.seconds, 2),
        "machine": machine(
            device_name=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            load_average_after=[round(x, 2) for x in os.getloadavg()],
        ),
    }
    print(f"\n{'measure':44}{'value':>12}")
    for name, value in (
        ("image size (px)", size),
        ("batch size", cfg.batch_size),
        ("device / torch threads", f"{device.type} / {torch.get_num_threads()}"),
        (f"training steps ({args.steps}), images/s", steps["images_per_s"]),
        ("validation pass, images/s", val_pass["images_per_s"]),
        (f"fine-tune ({epochs_run} epochs), images/s", finetune["images_per_s"]),
        ("  same, without validation passes", finetune["images_per_s_without_val_passes"]),
        ("linear probe val accuracy", f"{probe['val_accuracy']:.4f}"),
        (
            f"fine-tuned val accuracy (best epoch {finetune['best_epoch']})",
            f"{result.val_accuracy:.4f}",
        ),
    ):
        print(f"{name:44}{value!s:>12}")
    write_result(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
