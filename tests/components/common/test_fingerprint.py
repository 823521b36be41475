"""The run fingerprint and the record of the last successful run."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.common.config import PipelineConfig, build_config
from components.common.fingerprint import (
    RunRecord,
    load_record,
    record_path,
    run_fingerprint,
    save_record,
)


def _fp(cfg: PipelineConfig, digest: str = "d" * 32) -> str:
    return run_fingerprint(digest, cfg.model_dump(mode="json"), cfg.backbone_weights)


def test_data_configuration_and_backbone_weights_each_change_the_fingerprint(
    tmp_path: Path,
) -> None:
    base = PipelineConfig()
    assert _fp(base) == _fp(PipelineConfig())
    assert _fp(base, "e" * 32) != _fp(base)
    assert _fp(build_config({"train": {"finetune_epochs": 7}})) != _fp(base)
    assert _fp(build_config({"backbone": "resnet18"})) != _fp(base)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"one")
    with_weights = build_config({"backbone_weights": str(weights)})
    before = _fp(with_weights)
    weights.write_bytes(b"two")  # same path, other weights
    assert _fp(with_weights) != before


def _record(fingerprint: str = "f") -> RunRecord:
    return RunRecord(fingerprint, "d", "run1", "digits", 1, "models:/digits/1", "/r", "now")


def test_a_record_round_trips_and_is_replaced_whole(tmp_path: Path) -> None:
    path = record_path(tmp_path, "digits")
    assert load_record(path) is None
    save_record(path, _record("a"))
    save_record(path, _record("b"))
    assert load_record(path) == _record("b")
    assert [p.name for p in path.parent.iterdir()] == ["digits.json"]


@pytest.mark.parametrize("text", ["", "{", "[]", '{"fingerprint": "f"}', "\x00\xff"])
def test_an_unreadable_record_counts_as_none(tmp_path: Path, text: str) -> None:
    path = record_path(tmp_path, "digits")
    path.parent.mkdir(parents=True)
    path.write_text(text, errors="surrogateescape")
    assert load_record(path) is None
