"""Dataset names from folders (generic names skipped) and the content digest of a manifest."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from components.common.config import PipelineConfig, build_config
from components.common.errors import ConfigError
from components.data.digest import data_digest
from components.data.naming import dataset_name, derive_dataset_name, sanitise_name
from tasks.common.context import make_context, registered_model_name


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("mnist/train", "mnist"),
        ("MNIST/Train", "mnist"),
        ("Oxford Flowers 102/images/train", "oxford-flowers-102"),
        ("hymenoptera_data", "hymenoptera-data"),
        ("cats_vs_dogs/data/Validation", "cats-vs-dogs"),
        ("datasets/imgs/test", None),  # the first non-generic folder above tmp_path
        ("digits", "digits"),
    ],
)
def test_names_skip_generic_folders(tmp_path: Path, path: str, name: str | None) -> None:
    root = tmp_path / "work" / path
    root.mkdir(parents=True)
    assert derive_dataset_name(root) == (name or "work")


def test_only_generic_folders_give_a_fallback_name() -> None:
    assert derive_dataset_name(Path("/data/train")) == "dataset"


def test_configured_names_win_and_are_sanitised(tmp_path: Path) -> None:
    assert dataset_name(tmp_path / "mnist" / "train", "My Digits!") == "my-digits"
    assert dataset_name(tmp_path / "mnist" / "train", "???") == "mnist"  # nothing left of it
    assert sanitise_name("  Flowers__102  ") == "flowers-102"


def test_registered_model_name_comes_from_the_config_or_the_data(tmp_path: Path) -> None:
    data = tmp_path / "mnist" / "train"
    data.mkdir(parents=True)
    cfg = PipelineConfig(output_dir=tmp_path / "out")
    ctx = make_context(data, cfg)
    assert ctx.name == "mnist" and ctx.run_dir.name.startswith("mnist-")
    assert registered_model_name(ctx, cfg) == "mnist"
    named = build_config(
        {"output_dir": str(tmp_path / "out"), "tracking": {"model_name": "Digits_v2"}}
    )
    assert registered_model_name(ctx, named) == "Digits_v2"
    with pytest.raises(ConfigError, match=r"tracking\.model_name"):
        build_config({"tracking": {"model_name": "digits@champion"}})


def _manifest(rows: list[tuple[str, str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["path", "label", "split", "sha256"])


def test_data_digest_follows_content_labels_and_splits_not_paths() -> None:
    rows = [("/a/cat/1.png", "cat", "train", "1" * 64), ("/a/dog/2.png", "dog", "test", "2" * 64)]
    digest = data_digest(_manifest(rows))
    assert len(digest) == 32 and int(digest, 16) >= 0
    moved = [("/b/" + p.rsplit("/", 2)[-2] + "/x.png", *rest) for p, *rest in rows[::-1]]
    assert data_digest(_manifest(moved)) == digest
    relabelled = [rows[0], ("/a/dog/2.png", "cat", "test", "2" * 64)]
    resplit = [rows[0], ("/a/dog/2.png", "dog", "val", "2" * 64)]
    edited = [rows[0], ("/a/dog/2.png", "dog", "test", "3" * 64)]
    assert len({digest, *(data_digest(_manifest(r)) for r in (relabelled, resplit, edited))}) == 4
