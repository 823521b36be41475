"""What every benchmark records beside its figures: the machine it ran on, and the JSON file.

Imported by the scripts in this folder, which run as ``python benchmarks/<name>.py``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import onnxruntime
import torch


def machine(**extra: Any) -> dict[str, Any]:
    """The hardware and software a figure came from, plus the caller's own fields (load, device)."""
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cuda": torch.cuda.is_available(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        **extra,
    }


def write_result(result: dict[str, Any], path: Path | None) -> None:
    """Write ``result`` as indented JSON to ``path`` (nothing when None) and say where."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path}")
