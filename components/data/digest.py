"""One content digest for a dataset: which images, with which labels, in which split.

It names the data a model was trained and evaluated on wherever that is recorded (the MLflow
dataset input, the ONNX file's metadata, the registered version's tags), so two models can be told
apart by their data without comparing folders. Paths are left out: moving or renaming files keeps
the digest; changing a pixel, a label or a split assignment changes it.
"""

from __future__ import annotations

import hashlib

import pandas as pd

# MLflow stores dataset digests in a 36-character column; 32 hex characters are 128 bits.
DIGEST_CHARS = 32


def data_digest(manifest: pd.DataFrame) -> str:
    """sha256 over the sorted (split, label, file sha256) rows of ``manifest``, 32 hex characters."""
    rows = sorted(
        zip(
            manifest["split"].astype(str),
            manifest["label"].astype(str),
            manifest["sha256"].astype(str),
            strict=True,
        )
    )
    digest = hashlib.sha256()
    for split, label, sha in rows:
        digest.update(f"{split}\t{label}\t{sha}\n".encode())
    return digest.hexdigest()[:DIGEST_CHARS]
