from pathlib import Path

import pytest

from components.common.config import build_config, dump_config, load_config
from components.common.errors import ConfigError


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = build_config()
    path = tmp_path / "pipeline.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_unknown_key_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"train\.epochz"):
        build_config({"train": {"epochz": 3}})


def test_bad_value_names_key_and_value() -> None:
    with pytest.raises(ConfigError, match=r"strategy\.similar_threshold.*1\.5"):
        build_config({"strategy": {"similar_threshold": 1.5}})


def test_dotted_overrides_apply_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text("train:\n  device: cpu\n  batch_size: 8\n")
    cfg = load_config(path, {"train.batch_size": 4, "strategy.case": 2})
    assert (cfg.train.device, cfg.train.batch_size, cfg.strategy.case) == ("cpu", 4, 2)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_example_config_matches_the_defaults() -> None:
    example = Path(__file__).parents[3] / "infra" / "pipeline.example.yaml"
    assert load_config(example) == build_config()


@pytest.mark.parametrize(
    ("key", "section"),
    [
        ("batch_size", "train"),  # int
        ("finetune_lr", "train"),  # float
        ("image_size", "train"),  # int | "auto"
        ("case", "strategy"),  # Literal["auto", 1, 2, 3, 4]
        ("cut_block", "strategy"),  # int | None
    ],
)
def test_booleans_are_not_numbers(key: str, section: str) -> None:
    with pytest.raises(ConfigError, match=rf"{section}\.{key}: expected a number, not a boolean"):
        build_config({section: {key: True}})


def test_booleans_still_set_boolean_fields_and_text_numbers_still_parse() -> None:
    cfg = build_config({"data": {"follow_external_links": True}, "train": {"finetune_lr": "1e-3"}})
    assert cfg.data.follow_external_links is True and cfg.train.finetune_lr == 1e-3
    assert build_config().data.follow_external_links is False


def test_unreadable_config_files_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text("train:\n  device: [cpu\n")
    with pytest.raises(ConfigError, match=r"pipeline\.yaml is not valid YAML at line 3"):
        load_config(path)
    path.write_bytes(b"seed: 1\nname: \xff\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 0xff at offset 14\)"):
        load_config(path)
    with pytest.raises(ConfigError, match="is not a file"):
        load_config(tmp_path)
    path.write_bytes(b"\xef\xbb\xbfseed: 3\n")  # a BOM, as some Windows editors write
    assert load_config(path).seed == 3


def test_overrides_into_a_value_are_refused_and_into_an_empty_section_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train is already set to 5, not a section"):
        load_config(None, {"train": 5, "train.device": "cpu"})
    with pytest.raises(ConfigError, match="empty part"):
        load_config(None, {"train..device": "cpu"})
    path = tmp_path / "pipeline.yaml"
    path.write_text("train:\n")  # an empty section reads as null
    assert load_config(path, {"train.device": "cpu"}).train.device == "cpu"


def test_serve_settings_nest_and_refuse_unknown_keys() -> None:
    cfg = load_config(None, {"serve.limits.decoded_bytes": 1000, "serve.max_wait_ms": 0})
    assert (cfg.serve.limits.decoded_bytes, cfg.serve.max_wait_ms) == (1000, 0)
    assert cfg.serve.alias == "champion" and cfg.serve.max_batch is None
    with pytest.raises(ConfigError, match=r"serve\.limits\.body_byte"):
        build_config({"serve": {"limits": {"body_byte": 1}}})
