"""A fine-tune continues from the last run's weights when little changed, and only then."""

from dataclasses import replace
from pathlib import Path

import pytest

from components.common.config import TrainConfig
from components.common.fingerprint import RunRecord
from components.data.changes import DataChange, PreviousRun
from components.data.counting import count_dataset
from components.decision.strategy import StrategyConfig, select_case
from components.similarity.scores import SimilarityReport
from components.training.cases import TrainingJob, train_case
from components.training.warm_start import WarmStart, plan_warm_start

CLASSES = [str(d) for d in range(10)]


def _job(setup, cfg: TrainConfig, run_dir: Path, warm: WarmStart | None = None) -> TrainingJob:
    manifest, backbone, prep, classes, splits = setup
    sim = SimilarityReport(0.9, 0.85, 0.95, 0.2, ("bn",), (0.2,), 0.5, 0.5, 10, 1.5)
    plan = select_case(count_dataset(manifest), sim, StrategyConfig(case=3))
    return TrainingJob(
        plan, backbone, splits["train"], splits["val"], classes, cfg, prep, run_dir, 0,
        warm_start=warm,
    )  # fmt: skip


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"finetune_epochs": 1, "batch_size": 32, "num_workers": 0, **kw})


@pytest.fixture(scope="module")
def first(setup, tmp_path_factory: pytest.TempPathFactory):
    """The last run's model: case 3, one epoch from the pre-trained weights."""
    return train_case(_job(setup, _cfg(), tmp_path_factory.mktemp("first")))


def test_a_warm_start_continues_from_the_last_model(setup, first, tmp_path: Path) -> None:
    warm = WarmStart(first.model_path, "run-1", 1, 0.1, 0.05)
    result = train_case(_job(setup, _cfg(), tmp_path, warm))
    (attempt,) = result.attempts  # no probe and no fine-tune from the pre-trained weights
    assert attempt["init"] == "warm start" and attempt["from_run"] == "run-1"
    # it started from exactly the last model: same weights, same validation images
    assert attempt["start_val_accuracy"] == pytest.approx(first.val_accuracy, abs=1e-9)
    assert attempt["success"] is True and len(result.history) == 1
    assert result.changed_since_full == 0.05
    assert result.val_accuracy >= first.val_accuracy - 0.05


def test_a_warm_start_that_ends_worse_than_it_began_falls_back(
    setup, first, tmp_path: Path
) -> None:
    # a learning rate that wrecks any network in one epoch: the continued model scores far below
    # the one it started from, so the full fine-tune from the pre-trained weights runs after all
    cfg = _cfg(finetune_lr=50.0, warm_start_lr_factor=1.0)
    result = train_case(
        _job(setup, cfg, tmp_path, WarmStart(first.model_path, "run-1", 1, 1.0, 0.05))
    )
    inits = [a["init"] for a in result.attempts]
    assert inits == ["warm start", "frozen probe", "pretrained"]
    warm = result.attempts[0]
    assert warm["success"] is False and warm["val_accuracy"] < warm["start_val_accuracy"]
    assert result.changed_since_full == 0.0


def _previous(tmp_path: Path, share: float = 0.05, **record) -> PreviousRun:
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    fields = {
        "fingerprint": "f",
        "data_digest": "d",
        "mlflow_run_id": "run-1",
        "registered_model": "digits",
        "model_version": 1,
        "model_uri": "models:/digits/1",
        "run_dir": str(tmp_path),
        "finished_at": "now",
        "config_digest": "c",
        "model_path": str(model),
        "case": 3,
        "image_size": 64,
        "classes": tuple(CLASSES),
        "changed_since_full": 0.1,
    }
    changed = round(share * 1000)
    change = DataChange(1000, 1000 + changed, changed, 0, 0)
    return PreviousRun(RunRecord(**{**fields, **record}), change, True)


def test_a_warm_start_is_planned_only_when_everything_but_a_little_data_is_the_same(
    tmp_path: Path,
) -> None:
    cfg = TrainConfig()
    warm, why = plan_warm_start(_previous(tmp_path), 3, CLASSES, 64, cfg)
    assert warm is not None and warm.from_run == "run-1" and warm.epochs == 1
    assert warm.changed_since_full == pytest.approx(0.15)  # 10% before, 5% now
    assert "50 added" in why

    def refused(previous: PreviousRun | None, case: int = 3, size: int = 64, **cfg_kw) -> str:
        warm, why = plan_warm_start(previous, case, CLASSES, size, TrainConfig(**cfg_kw))
        assert warm is None
        return why

    assert "convex" in refused(_previous(tmp_path), case=1)
    assert "off" in refused(_previous(tmp_path), warm_start_max_change=0)
    assert "no earlier" in refused(None)
    assert "configuration" in refused(
        PreviousRun(_previous(tmp_path).record, _previous(tmp_path).change, False)
    )
    assert "over 25%" in refused(_previous(tmp_path, share=0.3))
    assert "trained case 4" in refused(_previous(tmp_path, case=4))
    assert "classes changed" in refused(_previous(tmp_path, classes=("a", "b")))
    assert "at 96 px" in refused(_previous(tmp_path, image_size=96))
    assert "since the last training" in refused(
        _previous(tmp_path, share=0.1, changed_since_full=0.2)
    )
    leaked = _previous(tmp_path)
    leaked = PreviousRun(leaked.record, replace(leaked.change, left_training=1), True)
    assert "1 image(s) it trained on are held out now" in refused(leaked)
    gone = _previous(tmp_path)
    Path(gone.record.model_path).unlink()
    assert "is gone" in refused(gone)
