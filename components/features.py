"""Pooled features at every cut point, computed once per image and cached by content.

A frozen backbone gives the same features every epoch, so the frozen cases (1 and 2), the probe that
chooses case 2's cut and the similarity stage all read this cache instead of running the network
again. The cache key is the image's sha256 plus the backbone and preprocessing, so renaming or moving
files costs nothing and a rerun on the same data embeds nothing. On CPU the pass runs in ONNX
Runtime (2.5-3x channels-last PyTorch's speed end to end), on CUDA in PyTorch with bf16 autocast;
both write the same float16 rows, so the engine is not part of the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from components.backbones import Backbone
from components.config import TrainConfig
from components.images import EvalTransform, Preprocessing, open_image

log = logging.getLogger(__name__)

# Measured end to end with ONNX Runtime streams on 2 CPUs: the best batch holds about this many
# pixels (8 images at 224 px: 142 img/s against 131 at 32; 64 at 64 px: 1,770-1,990 against 1,410
# at 8), since a smaller batch's activations stay in cache and its first run allocates less.
PIXELS_PER_CPU_BATCH = 8 * 224 * 224
CUDA_BATCH = 64
# Loader workers for the PyTorch engine (the ONNX engine decodes in its own streams).
NUM_WORKERS = 2
ENGINES = ("auto", "onnxruntime", "torch")


class ImageFiles(Dataset):
    """Image files decoded and transformed in loader workers, so decoding overlaps inference."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], transform: nn.Module) -> None:
        self.paths, self.labels, self.transform = list(paths), list(labels), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(open_image(self.paths[i])), self.labels[i]


def pooled_features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Global-average-pooled activations after every block and after the head convolution."""
    out = []
    x = model.bn1(model.conv_stem(x))
    for block in model.blocks:
        x = block(x)
        out.append(x.mean(dim=(2, 3)))
    out.append(model.bn2(model.conv_head(x)).mean(dim=(2, 3)))
    return out


def cache_key(backbone: Backbone, prep: Preprocessing) -> str:
    blob = json.dumps(
        {"backbone": backbone.name, "weights": backbone.weights_sha256, "prep": prep.to_dict()},
        sort_keys=True,
    )
    return f"{backbone.name.replace(':', '_')}-{prep.image_size}px-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


class FeatureCache:
    """Append-only store of pooled features keyed by image sha256 (one chunk file per extraction)."""

    def __init__(self, folder: Path, cut_points: Sequence[str]) -> None:
        self.folder = folder
        self.cut_points = tuple(cut_points)
        self._index: dict[str, np.ndarray] = {}
        for chunk in sorted(folder.glob("chunk-*.npz")):
            with np.load(chunk) as data:
                for sha, row in zip(data["sha256"], data["features"], strict=True):
                    self._index[str(sha)] = row

    def missing(self, shas: Sequence[str]) -> list[str]:
        return [s for s in dict.fromkeys(shas) if s not in self._index]

    def add(self, shas: Sequence[str], features: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"chunk-{uuid.uuid4().hex}.npz"
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, sha256=np.asarray(shas), features=features)
        tmp.rename(path)  # atomic: a killed run never leaves a half-written chunk behind
        self._index.update(zip(shas, features, strict=True))

    def get(self, shas: Sequence[str]) -> np.ndarray:
        return np.stack([self._index[s] for s in shas]).astype(np.float32)


def split_by_cut(
    features: np.ndarray, widths: Sequence[int], cut_points: Sequence[str]
) -> dict[str, np.ndarray]:
    """Slice the concatenated per-cut features back into one array per cut point."""
    bounds = np.cumsum([0, *widths])
    return {c: features[:, bounds[i] : bounds[i + 1]] for i, c in enumerate(cut_points)}


def extraction_batch(image_size: int, device: torch.device) -> int:
    """Images per extraction batch: ``CUDA_BATCH`` on a GPU; on a CPU the power of two nearest
    below ``PIXELS_PER_CPU_BATCH`` pixels (8 at 224 px, 64 at 64 px), between 1 and 128."""
    if device.type == "cuda":
        return CUDA_BATCH
    fits = max(1, PIXELS_PER_CPU_BATCH // (image_size * image_size))
    return min(128, 2 ** (fits.bit_length() - 1))


def choose_device(preference: str) -> torch.device:
    """CUDA when asked for or available (``auto``), else CPU."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def choose_engine(engine: str, device: torch.device) -> str:
    """``auto``: ONNX Runtime on CPU, where it is fastest; PyTorch with bf16 autocast on CUDA."""
    if engine not in ENGINES:
        raise ValueError(f"unknown feature engine {engine!r}; expected one of {ENGINES}")
    if engine == "auto":
        return "torch" if device.type == "cuda" else "onnxruntime"
    return engine


def image_loader(
    paths: Sequence[str], prep: Preprocessing, batch_size: int, num_workers: int, pin: bool
) -> DataLoader:
    """Batches of ``paths`` decoded in worker processes, so decoding overlaps inference."""
    return DataLoader(
        ImageFiles(paths, [0] * len(paths), EvalTransform(prep)),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin,
    )


def with_progress(batches: Iterable[object], n: int, total: int | None = None) -> tqdm:
    """``batches`` (``total`` of them, or ``len(batches)``) behind a bar for ``n`` images."""
    return tqdm(batches, total=total, desc=f"embedding {n} images", unit="batch", leave=False)


@torch.inference_mode()
def _run_torch(
    backbone: Backbone,
    paths: Sequence[str],
    prep: Preprocessing,
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> np.ndarray:
    model = backbone.model.to(device).eval()
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    loader = image_loader(paths, prep, batch_size, num_workers, pin=device.type == "cuda")
    chunks = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for images, _ in with_progress(loader, len(paths)):
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast:
            feats = pooled_features(model, images)
        chunks.append(torch.cat(feats, dim=1).float().cpu().numpy())
    backbone.model.to("cpu", memory_format=torch.contiguous_format)  # as the caller lent it
    return np.concatenate(chunks).astype(np.float16)


def manifest_features(
    rows: pd.DataFrame,
    backbone: Backbone,
    prep: Preprocessing,
    cache_root: Path,
    train: TrainConfig,
) -> dict[str, np.ndarray]:
    """``extract_features`` for manifest rows, on the device, engine and workers ``train`` sets."""
    return extract_features(
        backbone,
        rows["path"].tolist(),
        rows["sha256"].tolist(),
        prep,
        cache_root,
        num_workers=train.num_workers,
        device=choose_device(train.device),
        engine=train.feature_engine,
    )


def extract_features(
    backbone: Backbone,
    paths: Sequence[str],
    shas: Sequence[str],
    prep: Preprocessing,
    cache_root: Path,
    batch_size: int | None = None,
    num_workers: int = NUM_WORKERS,
    device: torch.device | None = None,
    engine: str = "auto",
) -> dict[str, np.ndarray]:
    """Features at every cut point for the given images, computing only what the cache lacks.

    Both engines write the same float16 rows under the same key, so either reads the other's cache.
    ``batch_size`` None sizes batches to the image size and device (``extraction_batch``).
    """
    device = device or choose_device("auto")
    engine = choose_engine(engine, device)
    batch_size = batch_size or extraction_batch(prep.image_size, device)
    folder = cache_root / cache_key(backbone, prep)
    cache = FeatureCache(folder, backbone.cut_points)
    todo = cache.missing(shas)
    log.info(
        "features: %d images, %d cached, %d to compute (%s)",
        len(shas),
        len(shas) - len(todo),
        len(todo),
        engine,
    )
    if todo:
        first_path = {s: p for p, s in zip(paths, shas, strict=True)}
        todo_paths = [first_path[s] for s in todo]
        computed = None
        if engine == "onnxruntime":
            # Imported here: onnx_features builds on pooled_features from this module.
            from components.onnx_features import extractor_onnx, onnx_rows

            computed = onnx_rows(
                lambda: extractor_onnx(backbone, prep, folder),
                "ONNX feature graph unusable, computing features with PyTorch",
                todo_paths,
                prep,
                batch_size,
                device,
            )
        if computed is None:
            computed = _run_torch(backbone, todo_paths, prep, batch_size, num_workers, device)
        cache.add(todo, computed)
    with torch.no_grad():  # one tiny pass gives every cut point's width
        widths = [
            f.shape[1] for f in pooled_features(backbone.model.eval(), torch.zeros(1, 3, 32, 32))
        ]
    return split_by_cut(cache.get(shas), widths, backbone.cut_points)
