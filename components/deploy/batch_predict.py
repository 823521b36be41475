"""Scoring a whole folder of images with a registered model, into one CSV.

The images go through the extraction engine's ONNX Runtime streams (``engine.extraction.
run_streams``: one stream per CPU decoding its own batch, the decoding of training), so a folder is
scored as fast as features are extracted. A file that cannot be scored is listed with its reason
instead of stopping the run: headers are checked first, and a batch that fails to decode is
scored again image by image to find the culprits.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnxruntime import InferenceSession
from PIL import Image

from components.deploy.classifier import softmax
from components.engine.extraction import choose_device, extraction_batch, run_streams, stream_plan
from components.engine.images import Preprocessing, decode_batch, refuse_bombs
from components.engine.onnx_graphs import available_cpus, feature_session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FolderPredictions:
    """Where the CSV went, how many images it scores and which files were left out, and why."""

    out_csv: Path
    scored: int
    bad: tuple[tuple[str, str], ...]


def image_files(root: Path, extensions: Sequence[str]) -> list[Path]:
    """Every file under ``root`` (recursively) with an image extension, sorted by path."""
    wanted = {e.lower() for e in extensions}
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in wanted)


def _header_problem(path: Path, max_pixels: int | None) -> str | None:
    try:
        with Image.open(path) as img:
            refuse_bombs(img, max_pixels)
    except Exception as err:  # any reason a file cannot be opened is reported, not raised
        return f"{type(err).__name__}: {err}"
    return None


def predict_folder(
    onnx_path: Path,
    labels: Sequence[str],
    prep: Preprocessing,
    root: Path,
    out_csv: Path,
    extensions: Sequence[str],
    max_pixels: int | None = None,
) -> FolderPredictions:
    """Write ``path,label,probability,p_<class>...`` for every image under ``root``."""
    paths = image_files(root, extensions)
    bad: list[tuple[str, str]] = []
    good: list[str] = []
    for path in paths:
        problem = _header_problem(path, max_pixels)
        if problem is None:
            good.append(str(path))
        else:
            bad.append((str(path), problem))
    device = choose_device("auto")
    batch = extraction_batch(prep.image_size, device)
    streams, threads = stream_plan(len(good), batch, available_cpus())
    session = feature_session(Path(onnx_path), device, threads)
    if good:
        try:
            logits = run_streams(session, good, prep, batch, streams, np.float32, "scoring")
        except Exception as err:  # a file whose header was fine but whose pixels are not
            log.warning("a batch failed to decode (%s); finding the files that fail", err)
            good, logits, more_bad = _in_chunks(session, good, prep, batch, streams)
            bad.extend(more_bad)
    else:
        logits = np.zeros((0, len(labels)), np.float32)
    _write_csv(out_csv, good, softmax(logits) if len(good) else logits, list(labels))
    log.info("scored %d images into %s; %d left out", len(good), out_csv, len(bad))
    return FolderPredictions(Path(out_csv), len(good), tuple(sorted(bad)))


def _in_chunks(
    session: InferenceSession, paths: Sequence[str], prep: Preprocessing, batch: int, streams: int
) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    kept: list[str] = []
    rows: list[np.ndarray] = []
    bad: list[tuple[str, str]] = []
    size = batch * streams * 4
    for start in range(0, len(paths), size):
        chunk = list(paths[start : start + size])
        try:
            rows.append(run_streams(session, chunk, prep, batch, streams, np.float32, "scoring"))
            kept.extend(chunk)
            continue
        except Exception:  # this chunk holds a bad file: score it image by image
            pass
        name = session.get_inputs()[0].name
        for path in chunk:
            try:
                x = decode_batch([path], prep)
            except Exception as err:
                bad.append((path, f"{type(err).__name__}: {err}"))
                continue
            rows.append(session.run(None, {name: x})[0].astype(np.float32))
            kept.append(path)
    return kept, np.concatenate(rows) if rows else np.zeros((0, 1), np.float32), bad


def _write_csv(out_csv: Path, paths: Sequence[str], probs: np.ndarray, labels: list[str]) -> None:
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with out_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "probability", *(f"p_{lab}" for lab in labels)])
        for path, row in zip(paths, probs, strict=True):
            best = int(row.argmax())
            writer.writerow([path, labels[best], f"{row[best]:.6f}", *(f"{p:.6f}" for p in row)])
