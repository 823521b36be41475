"""The promotion gate against a real SQLite MLflow registry, real ONNX files and ONNX Runtime.

The held-out images are flat colours whose class is the dominant channel, at 12 margins per class;
the models are one linear layer on the mean colour, with a handicap subtracted from class 2's
output. A handicap larger than an image's margin makes that image wrong, so each model's accuracy,
and which images two models disagree on, are known exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from components.common.config import ExportConfig, TrackingConfig
from components.deploy import promotion, tracking
from components.deploy.export import export_onnx
from components.deploy.heldout import HeldOut
from components.deploy.onnx_contract import ModelContract
from components.deploy.promotion import CHALLENGER, CHAMPION, Candidate, GateResult

LABELS = ["red", "green", "blue"]
PREP = {"image_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 1.0}
PER_CLASS = 12
PERFECT, SLIGHTLY_WORSE, MUCH_WORSE = 0.0, 0.5, 10.0  # handicaps: 36/36, 35/36, 24/36 right


@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory) -> HeldOut:
    """36 flat-colour PNGs; image i of a class has margin 0.4 + 0.145 i (in normalised units)."""
    root = tmp_path_factory.mktemp("held-out")
    paths, labels = [], []
    for c, label in enumerate(LABELS):
        for i in range(PER_CLASS):
            pixel = np.full(3, 115, np.uint8)  # 0.45
            pixel[c] = round(255 * (0.55 + 0.4 * i / (PER_CLASS - 1)))
            path = root / label / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.tile(pixel, (16, 16, 1))).save(path)
            paths.append(str(path))
            labels.append(label)
    return HeldOut("test", tuple(paths), tuple(labels), str(root))


def colour_model(handicap: float) -> torch.nn.Module:
    """Mean colour -> logits, class 2's logit lowered by ``handicap``."""
    linear = torch.nn.Linear(3, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(3))
        linear.bias.copy_(torch.tensor([0.0, 0.0, -handicap]))
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), linear).eval()


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[TrackingConfig, Path, str]:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    output_dir = tmp_path / "out"
    cfg = TrackingConfig(experiment="gate-tests")
    return cfg, output_dir, tracking.resolve_tracking_uri(cfg, output_dir)


def publish(
    store: tuple[TrackingConfig, Path, str],
    held: HeldOut,
    tmp_path: Path,
    handicap: float,
    *,
    labels: list[str] = LABELS,
    promote: str = "auto",
    name: str = "colours",
    status: str = "FINISHED",
) -> tuple[GateResult, tracking.RegisteredModel, tuple[str, ...]]:
    """One pipeline run's deploy steps: export, register, gate, finish, move the aliases."""
    cfg, output_dir, uri = store
    cfg = cfg.model_copy(update={"promote": promote})
    run_id = tracking.start_run(cfg, output_dir, f"h{handicap}", {})
    work = tmp_path / run_id
    contract = ModelContract(tuple(labels), PREP, "colour", "0" * 64, 1, None, "d" * 32)
    onnx_path = export_onnx(
        colour_model(handicap),
        torch.rand(4, 3, 16, 16),
        work / "model.onnx",
        ExportConfig(),
        contract,
    ).onnx_path
    registered = tracking.register_onnx_model(run_id, onnx_path, name, labels, PREP, uri)
    gate = promotion.run_gate(
        name,
        registered.version,
        Candidate(onnx_path, labels, PREP),
        held,
        cfg,
        run_id=run_id,
        tracking_uri=uri,
        work_dir=work,
    )
    tracking.finish_run(run_id, status, tracking_uri=uri)
    return gate, registered, promotion.apply_aliases(gate, registered, uri)


def aliases(uri: str, name: str = "colours") -> dict[str, int | None]:
    return {a: tracking.alias_version(name, a, tracking_uri=uri) for a in (CHALLENGER, CHAMPION)}


def test_the_better_version_becomes_champion_and_the_worse_does_not(
    store: tuple[TrackingConfig, Path, str], held: HeldOut, tmp_path: Path
) -> None:
    uri = store[2]
    first, _, moved = publish(store, held, tmp_path, MUCH_WORSE)
    assert first.verdict == "promoted-first" and first.promote and moved == (CHALLENGER, CHAMPION)
    assert first.challenger_accuracy == pytest.approx(24 / 36) and first.floor == 0.5
    assert first.champion_version is None and first.p_value is None
    assert aliases(uri) == {CHALLENGER: 1, CHAMPION: 1}

    better, _, _ = publish(store, held, tmp_path, PERFECT)
    assert better.verdict == "promoted-better" and better.champion_version == 1
    assert (better.challenger_accuracy, better.champion_accuracy) == (1.0, pytest.approx(24 / 36))
    assert (better.challenger_only_correct, better.champion_only_correct) == (12, 0)
    assert better.p_value == pytest.approx(2 * 0.5**12)  # exact McNemar: 12 of 12 discordant
    assert better.mlflow_validation.startswith("passed")
    assert aliases(uri) == {CHALLENGER: 2, CHAMPION: 2}

    worse, _, moved = publish(store, held, tmp_path, SLIGHTLY_WORSE)
    assert worse.verdict == "rejected-worse" and not worse.promote and moved == (CHALLENGER,)
    assert worse.challenger_accuracy == pytest.approx(35 / 36) and worse.p_value == 1.0
    assert "not significantly" in worse.reason and worse.mlflow_validation.startswith("failed")
    assert aliases(uri) == {CHALLENGER: 3, CHAMPION: 2}

    tie, _, _ = publish(store, held, tmp_path, PERFECT)
    assert tie.verdict == "promoted-no-worse" and tie.p_value == 1.0
    assert aliases(uri) == {CHALLENGER: 4, CHAMPION: 4}

    # What was decided is on the registered version, and MLflow's evaluations are child runs.
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    child = client.get_run(better.evaluation_runs[CHAMPION])
    assert child.data.metrics["accuracy_score"] == pytest.approx(24 / 36)
    assert child.data.tags["mlflow.parentRunId"] == client.get_model_version("colours", "2").run_id
    assert set(better.evaluation_runs) == {CHALLENGER, CHAMPION}
    text = better.markdown()
    assert "promoted-better" in text and "McNemar" in text and "0.6667" in text
    assert json.loads(json.dumps(better.to_dict()))["champion_version"] == 1


def test_promote_never_and_force(
    store: tuple[TrackingConfig, Path, str], held: HeldOut, tmp_path: Path
) -> None:
    uri = store[2]
    publish(store, held, tmp_path, PERFECT)
    forced, _, _ = publish(store, held, tmp_path, MUCH_WORSE, promote="force")
    assert forced.verdict == "forced" and forced.promote and "worse" in forced.reason
    assert aliases(uri) == {CHALLENGER: 2, CHAMPION: 2}

    never, _, moved = publish(store, held, tmp_path, PERFECT, promote="never")
    assert never.verdict == "kept-promote-never" and not never.promote and moved == (CHALLENGER,)
    assert never.p_value == pytest.approx(2 * 0.5**12)  # still measured, for the record
    assert aliases(uri) == {CHALLENGER: 3, CHAMPION: 2}


def test_a_champion_with_other_labels_is_not_compared_against(
    store: tuple[TrackingConfig, Path, str], held: HeldOut, tmp_path: Path
) -> None:
    uri = store[2]
    renamed = tuple(label.replace("blue", "violet") for label in held.labels)
    violet = HeldOut(held.split, held.paths, renamed, held.source)
    publish(store, violet, tmp_path, MUCH_WORSE, labels=["red", "green", "violet"])
    gate, _, moved = publish(store, held, tmp_path, PERFECT)
    assert gate.verdict == "refused-label-mismatch" and not gate.promote
    assert "violet" in gate.reason and gate.champion_accuracy is None
    assert gate.challenger_accuracy == 1.0 and moved == (CHALLENGER,)
    assert aliases(uri) == {CHALLENGER: 2, CHAMPION: 1}


def test_a_failed_run_moves_no_alias_even_when_its_model_wins(
    store: tuple[TrackingConfig, Path, str], held: HeldOut, tmp_path: Path
) -> None:
    uri = store[2]
    publish(store, held, tmp_path, MUCH_WORSE)
    gate, _, moved = publish(store, held, tmp_path, PERFECT, status="FAILED")
    assert gate.verdict == "promoted-better" and moved == ()
    gate, _, moved = publish(store, held, tmp_path, PERFECT, promote="force", status="FAILED")
    assert gate.promote and moved == ()
    assert aliases(uri) == {CHALLENGER: 1, CHAMPION: 1}


def test_the_first_version_must_pass_the_floor_on_held_out_images(
    store: tuple[TrackingConfig, Path, str], held: HeldOut, tmp_path: Path
) -> None:
    # Red and green are never predicted wrong, blue always: 24/36 is below a 0.7 floor.
    strict = (store[0].model_copy(update={"min_accuracy": 0.7}), *store[1:])
    gate, _, moved = publish(strict, held, tmp_path, MUCH_WORSE)
    assert gate.verdict == "rejected-below-floor" and gate.floor == 0.7 and moved == (CHALLENGER,)
    assert aliases(store[2]) == {CHALLENGER: 1, CHAMPION: None}

    empty = HeldOut("none", (), (), str(tmp_path))
    gate, _, _ = publish(store, empty, tmp_path, PERFECT, name="no-images")
    assert gate.verdict == "rejected-no-held-out" and not gate.promote
    assert aliases(store[2], "no-images") == {CHALLENGER: 1, CHAMPION: None}
