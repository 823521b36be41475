"""The classic PyTorch transfer-learning tutorial recipe against our whole flow, on the same data.

    python benchmarks/vs_tutorial.py --data DIR [--json OUT] [--epochs 25] [--output-dir TMP]

DIR must hold ``train/<class>/*`` and ``val/<class>/*``. The baseline is the tutorial's "ConvNet as
fixed feature extractor" (pytorch.org, beginner/transfer_learning_tutorial) with our backbone
(EfficientNet-Lite0) in place of ResNet-18: every backbone weight frozen, a new linear classifier
trained with SGD for 25 epochs on augmented images, the best validation epoch kept. It runs the
frozen backbone on every image in every epoch; the flow embeds each image once and fits the head on
cached features, which is where the speed-up comes from.

The flow runs as a subprocess with a fresh output folder (cold feature cache, fresh Prefect home
unless PREFECT_HOME is set), timed from process start to exit: the figure includes interpreter
start-up, imports and Prefect's ephemeral server, so it is conservative. Both sides see the same
validation images (the flow keeps a folder's own train/val split).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch
from report import machine, write_result
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from components.engine.backbones import load_backbone

REPO = Path(__file__).resolve().parent.parent
TUTORIAL_WORKERS = 4  # the tutorial's num_workers


def tutorial_loaders(
    data: Path, image_size: int, mean: tuple[float, ...], std: tuple[float, ...], workers: int
) -> dict[str, DataLoader]:
    """The tutorial's transforms, ImageFolder datasets and loaders (batch 4, shuffled, both phases).

    Stock ``ImageFolder``, as in the tutorial: it opens files with PIL and ``.convert("RGB")`` but
    only lists torchvision's ``IMG_EXTENSIONS``, which leave out ``.gif``; so hymenoptera's
    placeholder ``train/ants/imageNotFound.gif`` is not trained on here, as it is not in the tutorial.
    """
    resize = round(image_size * 256 / 224)  # 256 for 224 px, as in the tutorial
    data_transforms = {
        "train": transforms.Compose(
            [
                transforms.RandomResizedCrop(image_size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        ),
        "val": transforms.Compose(
            [
                transforms.Resize(resize),
                transforms.CenterCrop(image_size),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        ),
    }
    image_datasets = {
        x: datasets.ImageFolder(str(data / x), data_transforms[x]) for x in ("train", "val")
    }
    return {
        x: DataLoader(image_datasets[x], batch_size=4, shuffle=True, num_workers=workers)
        for x in ("train", "val")
    }


def train_model(
    model: nn.Module,
    loaders: dict[str, DataLoader],
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    num_epochs: int,
    device: torch.device,
) -> tuple[float, list[dict[str, float]]]:
    """The tutorial's ``train_model``: train and val phase per epoch, best val weights restored."""
    sizes = {x: len(loaders[x].dataset) for x in ("train", "val")}
    best_state = copy.deepcopy(model.state_dict())
    best_acc = 0.0
    history: list[dict[str, float]] = []
    for epoch in range(num_epochs):
        start = time.perf_counter()
        row: dict[str, float] = {"epoch": epoch + 1}
        for phase in ("train", "val"):
            # As in the tutorial, train() for the train phase: the frozen backbone's BatchNorm layers
            # then normalise with batch statistics and keep updating their running statistics (no
            # gradient needed for that), and its dropout is active. Kept on purpose: it is the recipe.
            model.train() if phase == "train" else model.eval()
            running_loss, running_corrects = 0.0, 0
            for inputs, labels in loaders[phase]:
                inputs, labels = inputs.to(device), labels.to(device)
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    _, preds = torch.max(outputs, 1)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                running_loss += loss.item() * inputs.size(0)
                running_corrects += int(torch.sum(preds == labels.data))
            if phase == "train":
                scheduler.step()
            row[f"{phase}_loss"] = round(running_loss / sizes[phase], 4)
            row[f"{phase}_accuracy"] = round(running_corrects / sizes[phase], 4)
            if phase == "val" and running_corrects / sizes[phase] > best_acc:
                best_acc = running_corrects / sizes[phase]
                best_state = copy.deepcopy(model.state_dict())
        row["seconds"] = round(time.perf_counter() - start, 2)
        history.append(row)
        print(
            f"  epoch {epoch + 1}/{num_epochs}: train acc {row['train_accuracy']:.4f}, "
            f"val acc {row['val_accuracy']:.4f} ({row['seconds']:.1f} s)",
            flush=True,
        )
    model.load_state_dict(best_state)
    return best_acc, history


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (loader workers, the flow).

    Unlike wall time it barely moves when other work shares the machine, so it is reported too.
    """
    own, children = (
        resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_tutorial(data: Path, epochs: int) -> dict[str, Any]:
    """The whole recipe, from building the datasets to the restored best model, timed."""
    start, cpu_start = time.perf_counter(), cpu_seconds()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = load_backbone("efficientnet_lite0")
    prep = backbone.preprocessing
    workers = min(TUTORIAL_WORKERS, os.cpu_count() or 1)
    loaders = tutorial_loaders(data, prep.image_size, prep.mean, prep.std, workers)
    model = copy.deepcopy(backbone.model)
    for param in model.parameters():
        param.requires_grad = False
    num_classes = len(loaders["train"].dataset.classes)
    model.classifier = nn.Linear(model.num_features, num_classes)  # new, trainable
    model = model.to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.classifier.parameters(), lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    train_start = time.perf_counter()
    best_acc, history = train_model(model, loaders, criterion, optimizer, scheduler, epochs, device)
    end = time.perf_counter()
    return {
        "seconds": round(end - start, 2),
        "cpu_seconds": round(cpu_seconds() - cpu_start, 1),
        "train_model_seconds": round(end - train_start, 2),
        "val_accuracy": best_acc,
        "best_epoch": max(history, key=lambda r: r["val_accuracy"])["epoch"],
        "epochs": epochs,
        "num_workers": workers,
        "device": str(device),
        "train_images": len(loaders["train"].dataset),
        "val_images": len(loaders["val"].dataset),
        "history": history,
    }


def _summary_from_stdout(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                summary = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "metrics" in summary:
                return summary
    raise RuntimeError("the flow printed no JSON summary")


def run_pipeline(data: Path, out: Path) -> dict[str, Any]:
    """Our flow as a fresh process on a fresh output folder, timed from start to exit."""
    env = dict(os.environ)
    env.setdefault("PREFECT_HOME", str(out / "prefect-home"))
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "--data",
        str(data),
        "--json",
        "--output-dir",
        str(out / "runs"),
    ]
    start, cpu_start = time.perf_counter(), cpu_seconds()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"the flow exited with {proc.returncode}")
    summary = _summary_from_stdout(proc.stdout)
    return {
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 1),
        "val_accuracy": summary["metrics"]["val_accuracy"],
        "flow_seconds": summary["seconds"],
        "stage_seconds": summary["stage_seconds"],
        "case": summary["case"],
        "cut": summary["cut"],
        "image_size": summary["image_size"],
        "counts": summary["counts"]["per_split"],
        "quarantined": summary["quarantined"],
        "device": summary["device"],
        "command": "python -m flows.cli run --data DIR --json --output-dir FRESH",
        "fresh_prefect_home": env["PREFECT_HOME"] == str(out / "prefect-home"),
    }


def warm_file_cache(data: Path) -> int:
    """Read every file once so neither side pays for cold disk reads the other does not."""
    total = 0
    for path in data.rglob("*"):
        if path.is_file():
            total += len(path.read_bytes())
    return total


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, type=Path, help="folder with train/ and val/")
    parser.add_argument("--json", type=Path, help="write results here")
    parser.add_argument("--epochs", type=int, default=25, help="tutorial epochs (25 in the recipe)")
    parser.add_argument(
        "--output-dir", type=Path, help="scratch folder for the flow's run (default: a temp dir)"
    )
    args = parser.parse_args()
    data = args.data.resolve()
    for split in ("train", "val"):
        if not (data / split).is_dir():
            parser.error(
                f"{data} has no {split}/ folder; the tutorial recipe needs train/ and val/"
            )
    # A terminated run still unwinds: the flow's process is killed and the scratch folder removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scratch = Path(tempfile.mkdtemp(prefix="vs-tutorial-", dir=args.output_dir))
    load_before = os.getloadavg()
    try:
        warm_file_cache(data)
        print(f"tutorial recipe ({args.epochs} epochs) on {data}", flush=True)
        tutorial = run_tutorial(data, args.epochs)
        print("our flow (fresh process, cold feature cache)", flush=True)
        pipeline = run_pipeline(data, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    speedup = tutorial["seconds"] / pipeline["seconds"]
    cpu_speedup = tutorial["cpu_seconds"] / pipeline["cpu_seconds"]
    # The flow's own clock leaves out start-up: imports and Prefect's ephemeral server.
    flow_speedup = tutorial["seconds"] / pipeline["flow_seconds"]
    print(f"\n{'':18}{'seconds':>10}{'CPU seconds':>13}{'val accuracy':>14}")
    for name, side in (("tutorial recipe", tutorial), ("our flow", pipeline)):
        print(
            f"{name:18}{side['seconds']:>10.1f}{side['cpu_seconds']:>13.1f}"
            f"{side['val_accuracy']:>14.4f}"
        )
    print(
        f"speed-up {speedup:.1f}x (CPU time {cpu_speedup:.1f}x; flow body alone "
        f"{pipeline['flow_seconds']:.1f} s, {flow_speedup:.1f}x); accuracy {pipeline['val_accuracy'] - tutorial['val_accuracy']:+.4f} "
        f"(flow case {pipeline['case']}, {tutorial['val_images']} validation images)"
    )
    result = {
        "dataset": data.name,
        "tutorial": tutorial,
        "pipeline": pipeline,
        "speedup": round(speedup, 2),
        "cpu_time_speedup": round(cpu_speedup, 2),
        "flow_body_speedup": round(flow_speedup, 2),
        "target": {"speedup_at_least": 8, "val_accuracy_at_least": "tutorial"},
        "meets_target": speedup >= 8 and pipeline["val_accuracy"] >= tutorial["val_accuracy"],
        "machine": machine(
            load_average_before=[round(x, 2) for x in load_before],
            load_average_after=[round(x, 2) for x in os.getloadavg()],
        ),
    }
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
