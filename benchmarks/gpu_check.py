"""One short check of the GPU path (about 2-3 minutes on a GPU; also runs, tiny, on a CPU).

    python benchmarks/gpu_check.py [--json OUT] [--seconds 5]

Reports the device, torch/CUDA versions and bf16 support, then times EfficientNet-Lite0 at 224 px:
inference fp32 vs bf16 autocast (channels-last), a training step fp32 vs bf16 autocast, and ONNX
Runtime on the exported model (with the CUDA provider when there is a GPU, from host arrays and
with device-resident I/O binding). Finally it runs the pipeline's own ``finetune()`` for one epoch
on generated images, which on CUDA exercises bf16 autocast, channels-last and pinned memory.

Every section is timed for about ``--seconds`` and fails on its own: an error is recorded in the
JSON and the exit status is 1, but the other sections still run. Without CUDA it says so and uses
tiny batches and iteration counts, so the script can be smoke-tested anywhere.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
from PIL import Image
from report import write_result
from torch import nn

from components.common.config import ExportConfig
from components.deploy.export import INPUT_NAME, OUTPUT_NAME, export_onnx, onnx_session
from components.engine.backbones import Backbone, fresh_model, load_backbone
from components.engine.images import Preprocessing
from components.training.finetune import FinetuneSettings, finetune, train_step


def throughput(
    step: Callable[[], object],
    batch: int,
    seconds: float,
    sync: Callable[[], None],
    warmup: int,
    min_iters: int,
) -> dict[str, float]:
    """Images/s of ``step`` (one batch) run for about ``seconds`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    sync()
    iters, start = 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - start < seconds:
        step()
        iters += 1
    sync()
    elapsed = time.perf_counter() - start
    return {
        "batch": batch,
        "iters": iters,
        "seconds": round(elapsed, 3),
        "images_per_s": round(iters * batch / elapsed, 1),
    }


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device.type,
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "name": torch.cuda.get_device_name(device),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cudnn": torch.backends.cudnn.version(),
            "bf16_supported": torch.cuda.is_bf16_supported(),
            # torch's defaults: fp32 convolutions may use TF32 on Ampere and later, matmuls do not.
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        }
    else:
        info |= {"name": "no CUDA (CPU)", "bf16_supported": None}
    return info


def time_inference(
    model: nn.Module, device: torch.device, batch: int, size: int, args: Settings
) -> dict[str, Any]:
    """Forward passes of the source network (1000 classes), fp32 and under bf16 autocast."""
    model = copy.deepcopy(model).to(device).to(memory_format=torch.channels_last).eval()
    x = torch.randn(batch, 3, size, size, device=device).contiguous(
        memory_format=torch.channels_last
    )

    def forward(bf16: bool) -> Callable[[], torch.Tensor]:
        @torch.inference_mode()
        def step() -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                return model(x)

        return step

    out: dict[str, Any] = {}
    for name, bf16 in (("fp32", False), ("bf16_autocast", True)):
        out[name] = throughput(
            forward(bf16), batch, args.seconds, args.sync, args.warmup, args.min_iters
        )
    out["bf16_speedup"] = round(
        out["bf16_autocast"]["images_per_s"] / out["fp32"]["images_per_s"], 2
    )
    return out


def training_step(
    backbone: Backbone, device: torch.device, batch: int, size: int, bf16: bool
) -> Callable[[], None]:
    """One fine-tuning step of the whole network (the pipeline's own step, AdamW), as a closure."""
    model = fresh_model(backbone, 10, copy_backbone=True).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(batch, 3, size, size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        train_step(model, x, y, opt, loss_fn, device, bf16)

    return step


def time_training(
    backbone: Backbone, device: torch.device, batch: int, size: int, args: Settings
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, bf16 in (("fp32", False), ("bf16_autocast", True)):
        step = training_step(backbone, device, batch, size, bf16)
        out[name] = throughput(step, batch, args.seconds, args.sync, args.warmup, args.min_iters)
        del step
    out["bf16_speedup"] = round(
        out["bf16_autocast"]["images_per_s"] / out["fp32"]["images_per_s"], 2
    )
    return out


def time_onnxruntime(
    backbone: Backbone, device: torch.device, batch: int, size: int, work: Path, args: Settings
) -> dict[str, Any]:
    """Export with the pipeline's exporter (opset 18, parity-checked), then time ORT."""
    model = backbone.model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    start = time.perf_counter()
    exported = export_onnx(
        model, torch.randn(4, 3, size, size), work / "lite0.onnx", ExportConfig()
    )
    out: dict[str, Any] = {
        "export_seconds": round(time.perf_counter() - start, 2),
        "exporter": exported.exporter,
        "opset": exported.opset,
        "parity_max_abs_diff": exported.max_abs_diff,
        "parity_provider": exported.provider,
    }
    session = onnx_session(exported.onnx_path)  # the pipeline's own session: CUDA when usable
    provider = session.get_providers()[0]
    out["provider"] = provider
    out["cuda_requested_but_missing"] = (
        device.type == "cuda" and provider != "CUDAExecutionProvider"
    )
    host = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    out["host_arrays"] = throughput(
        lambda: session.run([OUTPUT_NAME], {INPUT_NAME: host}),
        batch,
        args.seconds,
        lambda: None,
        args.warmup,
        args.min_iters,
    )
    if provider == "CUDAExecutionProvider":
        x = torch.from_numpy(host).to(device)
        y = torch.empty(batch, 1000, device=device)
        binding = session.io_binding()
        binding.bind_input(INPUT_NAME, "cuda", 0, np.float32, list(x.shape), x.data_ptr())
        binding.bind_output(OUTPUT_NAME, "cuda", 0, np.float32, list(y.shape), y.data_ptr())
        out["io_binding"] = throughput(
            lambda: session.run_with_iobinding(binding),
            batch,
            args.seconds,
            args.sync,
            args.warmup,
            args.min_iters,
        )
    out["note"] = "ONNX Runtime runs fp32 with TF32 off (the pipeline's session settings)"
    return out


def generated_images(root: Path, per_class: int, side: int, seed: int) -> dict[str, list]:
    """Two learnable classes of noisy stripes (horizontal vs vertical), written as PNG files."""
    rng = np.random.default_rng(seed)
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(("horizontal", "vertical")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            period = int(rng.integers(8, 24))
            wave = (np.arange(side) // (period // 2)) % 2 * 160
            stripes = np.broadcast_to(wave[:, None] if label == 0 else wave[None, :], (side, side))
            noise = rng.integers(0, 96, (side, side, 3))
            pixels = np.clip(stripes[..., None] + noise, 0, 255).astype(np.uint8)
            path = root / name / f"{i:04d}.png"
            Image.fromarray(pixels).save(path)
            paths.append(str(path))
            labels.append(label)
    return {"paths": paths, "labels": labels}


def run_finetune(
    backbone: Backbone, device: torch.device, per_class: int, size: int, batch: int, work: Path
) -> dict[str, Any]:
    """The pipeline's ``finetune()`` for one epoch on generated images (train 3/4, val 1/4)."""
    data = generated_images(work / "images", per_class, round(size * 1.15), seed=0)
    order = np.random.default_rng(1).permutation(len(data["paths"]))
    cut = len(order) * 3 // 4
    split = {
        name: ([data["paths"][i] for i in idx], [data["labels"][i] for i in idx])
        for name, idx in (("train", order[:cut]), ("val", order[cut:]))
    }
    native = backbone.preprocessing
    prep = Preprocessing(size, native.mean, native.std, native.crop_pct, native.interpolation)
    settings = FinetuneSettings(
        epochs=1,
        lr=1e-3,
        body_lr_factor=0.1,
        weight_decay=1e-4,
        label_smoothing=0.1,
        batch_size=batch,
        num_workers=min(4, os.cpu_count() or 1),
    )
    model = fresh_model(backbone, 2, copy_backbone=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = finetune(
        model, split["train"], split["val"], prep, settings, work / "ckpt.pt", device, seed=0
    )
    out = {
        "image_size": size,
        "train_images": len(split["train"][0]),
        "val_images": len(split["val"][0]),
        "batch_size": batch,
        "num_workers": settings.num_workers,
        "seconds": round(result.seconds, 2),
        "val_accuracy": result.val_accuracy,
        "history": list(result.history),
        # What finetune() turns on for this device (see components/training/finetune.py).
        "bf16_autocast": device.type == "cuda" and torch.cuda.is_bf16_supported(),
        "pin_memory": device.type == "cuda",
        "channels_last": True,
        "model_back_on_cpu": all(p.device.type == "cpu" for p in model.parameters()),
    }
    if device.type == "cuda":
        out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


class Settings:
    """How long and how hard to measure on this device."""

    def __init__(self, device: torch.device, seconds: float) -> None:
        cuda = device.type == "cuda"
        self.seconds = seconds
        self.warmup = 5 if cuda else 1
        self.min_iters = 10 if cuda else 1
        self.infer_batch = 128 if cuda else 2
        self.train_batch = 32 if cuda else 2  # 32: the pipeline's default batch size
        self.size = 224
        self.finetune_per_class = 160 if cuda else 6
        self.finetune_size = 224 if cuda else 64
        self.finetune_batch = 32 if cuda else 4
        self.sync: Callable[[], None] = torch.cuda.synchronize if cuda else (lambda: None)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write results here")
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="timing per measurement (default 5)"
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
        if hasattr(onnxruntime, "preload_dlls"):
            try:  # the CUDA provider needs the CUDA/cuDNN libraries torch ships as wheels
                onnxruntime.preload_dlls()
            except Exception as err:  # reported; the ORT section will say more
                print(f"onnxruntime.preload_dlls failed: {err}", file=sys.stderr)
    settings = Settings(device, args.seconds)
    start = time.perf_counter()
    result: dict[str, Any] = {"info": device_info(device), "errors": {}}
    info = result["info"]
    print(
        f"{info['name']}; torch {info['torch']} (CUDA build {info['cuda_build']}); "
        f"bf16 {info['bf16_supported']}; ORT {info['onnxruntime']}",
        flush=True,
    )
    backbone = load_backbone("efficientnet_lite0")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        sections: dict[str, Callable[[], dict[str, Any]]] = {
            "inference": lambda: time_inference(
                backbone.model, device, settings.infer_batch, settings.size, settings
            ),
            "training_step": lambda: time_training(
                backbone, device, settings.train_batch, settings.size, settings
            ),
            "onnxruntime": lambda: time_onnxruntime(
                backbone, device, settings.infer_batch, settings.size, work, settings
            ),
            "finetune": lambda: run_finetune(
                backbone,
                device,
                settings.finetune_per_class,
                settings.finetune_size,
                settings.finetune_batch,
                work,
            ),
        }
        for name, run in sections.items():
            section_start = time.perf_counter()
            print(f"{name} ...", flush=True)
            try:
                result[name] = run()
            except Exception as err:  # one failed section must not hide the others
                traceback.print_exc()
                result["errors"][name] = f"{type(err).__name__}: {err}"
            print(f"  {time.perf_counter() - section_start:.1f} s", flush=True)
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    print_table(result)
    write_result(result, args.json)
    return 1 if result["errors"] else 0


def print_table(result: dict[str, Any]) -> None:
    rows: list[tuple[str, str]] = []
    for section, label in (("inference", "inference"), ("training_step", "training step")):
        for kind in ("fp32", "bf16_autocast"):
            if section in result:
                m = result[section][kind]
                rows.append((f"{label} {kind} (batch {m['batch']})", f"{m['images_per_s']:.1f}"))
    if "onnxruntime" in result:
        ort = result["onnxruntime"]
        for kind in ("host_arrays", "io_binding"):
            if kind in ort:
                m = ort[kind]
                rows.append(
                    (
                        f"ORT {ort['provider']} {kind} (batch {m['batch']})",
                        f"{m['images_per_s']:.1f}",
                    )
                )
    print(f"\n{'Lite0 at 224 px':58}{'images/s':>10}")
    for name, value in rows:
        print(f"{name:58}{value:>10}")
    if "finetune" in result:
        ft = result["finetune"]
        print(
            f"finetune(): 1 epoch, {ft['train_images']} images at {ft['image_size']} px in "
            f"{ft['seconds']:.1f} s, val accuracy {ft['val_accuracy']:.3f}, bf16 {ft['bf16_autocast']}"
        )
    for name, err in result["errors"].items():
        print(f"FAILED {name}: {err}")
    print(f"total {result['total_seconds']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
