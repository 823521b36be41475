"""A dataset's name from its folder, for run folders, MLflow runs and the registered model.

The leaf of a data path is often a split or a container (``mnist/train``, ``flowers/images``), and
a registry full of models called ``train`` says nothing; so generic folder names are skipped on the
way up to the first one that names the data.
"""

from __future__ import annotations

import re
from pathlib import Path

GENERIC_FOLDERS = frozenset(
    {
        "train",
        "val",
        "valid",
        "validation",
        "test",
        "data",
        "dataset",
        "datasets",
        "images",
        "imgs",
    }
)
FALLBACK_NAME = "dataset"


def sanitise_name(raw: str) -> str:
    """Lower-case kebab: letters and digits kept, every other run of characters one '-'.

    Safe as an MLflow registered model name, in ``models:/NAME@alias`` URIs, as a folder name
    (run folders, Triton model repositories) and in Prefect run names.
    """
    return re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")


def derive_dataset_name(data_root: Path) -> str:
    """The first folder, walking up from ``data_root``, whose name is not generic, sanitised.

    ``/data/mnist/train`` gives ``mnist``; a path made only of generic names gives ``dataset``.
    """
    for folder in (Path(data_root).resolve(), *Path(data_root).resolve().parents):
        if folder.name.lower() in GENERIC_FOLDERS:
            continue
        if name := sanitise_name(folder.name):
            return name
    return FALLBACK_NAME


def dataset_name(data_root: Path, configured: str | None = None) -> str:
    """``configured`` (``data.name``) sanitised when set, else derived from the folder."""
    if configured and (name := sanitise_name(configured)):
        return name
    return derive_dataset_name(data_root)
