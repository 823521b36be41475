from dataclasses import replace
from pathlib import Path

import pytest
import torch

from components.common.config import TrainConfig
from components.data.counting import count_dataset
from components.data.digest import data_digest
from components.decision.strategy import StrategyConfig, select_case
from components.similarity.scores import SimilarityReport
from components.training.cases import TrainingJob, choose_image_size, train_case
from components.training.checkpoints import checkpoint_dir, checkpoint_key, clean_checkpoints
from components.training.finetune import FinetuneSettings, finetune
from components.training.models import ModelSpec, build_model, load_model


def _plan(manifest, case: int):
    sim = SimilarityReport(0.1, 0.05, 0.15, 5.0, ("bn",), (5.0,), 0.5, 0.5, 10, 1.5)
    return select_case(count_dataset(manifest), sim, StrategyConfig(case=case, cut_block=3))


def _job(setup, plan, cfg: TrainConfig, run_dir: Path) -> TrainingJob:
    _, backbone, prep, classes, splits = setup
    return TrainingJob(
        plan, backbone, splits["train"], splits["val"], classes, cfg, prep, run_dir, 0
    )


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"finetune_epochs": 1, "batch_size": 32, "num_workers": 0, **kw})


@pytest.mark.parametrize("case", [1, 2])
def test_frozen_cases_train_a_head_only(setup, tmp_path: Path, case: int) -> None:
    manifest = setup[0]
    result = train_case(_job(setup, _plan(manifest, case), _cfg(), tmp_path))
    assert result.spec.cut == ("head" if case == 1 else "block3")
    assert result.val_accuracy > 0.8 and result.model_path.is_file()


def test_case_4_falls_back_to_random_init_and_keeps_the_better(setup, tmp_path: Path) -> None:
    manifest = setup[0]
    cfg = _cfg(success_accuracy=1.0)  # only a perfect score counts as success
    result = train_case(_job(setup, _plan(manifest, 4), cfg, tmp_path))
    inits = [a["init"] for a in result.attempts]
    pretrained = next(a for a in result.attempts if a["init"] == "pretrained")
    assert pretrained["val_accuracy"] < 1.0  # ten classes and one epoch: never perfect
    assert inits == ["frozen probe", "pretrained", "random"] and pretrained["success"] is False
    best = max(a["val_accuracy"] for a in result.attempts if a["init"] != "frozen probe")
    assert result.val_accuracy == best
    assert (tmp_path / "checkpoints" / "random.pt").is_file()


def test_a_fine_tune_that_never_beats_its_starting_probe_keeps_the_start(
    setup, tmp_path: Path
) -> None:
    """A learning rate that wrecks the network: every epoch scores below the start (the pre-trained
    body with the probe's head), so the start's weights are what the case ships."""
    manifest = setup[0]
    backbone = setup[1]
    cfg = _cfg(finetune_epochs=2, finetune_lr=50.0)
    result = train_case(_job(setup, _plan(manifest, 3), cfg, tmp_path))
    probe, pretrained = result.attempts
    assert pretrained["kept"] == "start" and pretrained["best_epoch"] == -1
    assert max(h["val_accuracy"] for h in result.history) < pretrained["start_val_accuracy"]
    assert result.val_accuracy == pretrained["start_val_accuracy"] > 0.8
    assert abs(result.val_accuracy - probe["val_accuracy"]) < 0.05  # the same network, re-scored
    shipped = load_model(result.model_path, backbone)[0].state_dict()
    fresh = build_model(ModelSpec(backbone.name, 3, None, 10, "pretrained", 64), backbone)
    body = [k for k in fresh.state_dict() if not k.startswith("classifier")]
    assert body and all(torch.equal(shipped[k], fresh.state_dict()[k]) for k in body)


def test_scoring_the_start_leaves_the_epochs_as_they_were(setup, tmp_path: Path) -> None:
    """The start's validation pass draws no random numbers the epochs would have drawn: with the
    same seed, a fine-tune that keeps its start trains exactly as one that does not."""
    _, backbone, prep, _, splits = setup
    settings = FinetuneSettings(
        epochs=1, lr=1e-3, body_lr_factor=0.1, weight_decay=0.01, label_smoothing=0.1,
        batch_size=32, num_workers=0, freeze_bn=True,
    )  # fmt: skip
    results = []
    for keep in (False, True):
        torch.manual_seed(0)  # the same new head
        model = build_model(ModelSpec(backbone.name, 3, None, 10, "pretrained", 64), backbone)
        results.append(
            finetune(
                model,
                (splits["train"].paths, splits["train"].labels.tolist()),
                (splits["val"].paths, splits["val"].labels.tolist()),
                prep,
                replace(settings, keep_start=keep),
                tmp_path / f"keep-{keep}.pt",
                torch.device("cpu"),
                0,
            )
        )
    plain, kept = results
    assert plain.start_accuracy is None and kept.start_accuracy is not None
    assert kept.history == plain.history


def test_fine_tune_resumes_from_its_checkpoint(setup, tmp_path: Path) -> None:
    manifest = setup[0]
    plan = _plan(manifest, 3)
    first = train_case(_job(setup, plan, _cfg(), tmp_path))
    cfg = TrainConfig(finetune_epochs=2, batch_size=32, num_workers=0)
    second = train_case(_job(setup, plan, cfg, tmp_path))
    attempt = next(a for a in second.attempts if a["init"] == "pretrained")
    assert attempt["resumed_from_epoch"] == 1
    assert len(second.history) == 2 and second.history[0] == first.history[0]


def test_image_size_follows_the_images() -> None:
    assert choose_image_size("auto", 333, 224)[0] == 224
    assert choose_image_size("auto", 28, 224)[0] == 64
    assert choose_image_size("auto", 100, 224)[0] == 224  # 2 x 100 rounds up past native
    assert choose_image_size(128, 28, 224) == (128, "128 px set in configuration")


def test_a_raced_fine_tune_that_is_clearly_behind_stops_and_skips_the_fallback(
    setup, tmp_path: Path
) -> None:
    """Verification's early stop, on a real fine-tune: behind a rival no epoch can beat, case 4
    stops at its first comparison (epoch 1 of 3) and does not try random initialisation."""
    from components.training.finetune import RaceRule

    manifest = setup[0]
    job = _job(setup, _plan(manifest, 4), _cfg(finetune_epochs=3), tmp_path)
    result = train_case(replace(job, race=RaceRule(after_epoch=0, behind=1.01, ahead=2.0)))
    pretrained = next(a for a in result.attempts if a["init"] == "pretrained")
    assert pretrained["raced"] == "behind after epoch 1"
    assert len(result.history) == 1
    assert [a["init"] for a in result.attempts] == ["frozen probe", "pretrained"]


def test_race_verdicts() -> None:
    from components.training.finetune import RaceRule

    rule = RaceRule(after_epoch=2, behind=0.8, ahead=0.9)
    assert rule.verdict(1, [0.1, 0.1]) is None  # before the first comparison nothing is settled
    assert rule.verdict(2, [0.5, 0.6, 0.79]) == "behind"
    assert rule.verdict(2, [0.5, 0.6, 0.91]) == "ahead"
    assert rule.verdict(5, [0.8, 0.85]) is None
    # judged on the best epoch, whose weights are kept and reported, not on the last one
    assert rule.verdict(2, [0.95, 0.6, 0.5]) == "ahead"
    assert rule.verdict(2, [0.5, 0.85, 0.7]) is None


def test_class_weights_only_when_imbalanced_or_asked(setup, tmp_path: Path) -> None:
    import numpy as np

    from components.data.splits import SplitData
    from components.training.cases import class_weights

    manifest = setup[0]
    job = _job(setup, _plan(manifest, 1), _cfg(), tmp_path)
    assert class_weights(job) is None  # digits are balanced
    assert class_weights(replace(job, cfg=_cfg(class_weights="on"))) is not None
    labels = np.array([0] * 110 + [1] * 10 + list(range(2, 10)) * 11)
    skewed = replace(job, train=SplitData([""] * len(labels), labels, {}))
    weights = class_weights(skewed)
    assert weights is not None and weights[1] > 5 * weights[0]
    assert class_weights(replace(skewed, cfg=_cfg(class_weights="off"))) is None


def test_a_killed_fine_tune_is_resumed_by_the_next_run_with_the_same_key(
    setup, tmp_path: Path
) -> None:
    manifest = setup[0]
    plan = _plan(manifest, 3)
    key = checkpoint_key(data_digest(manifest), {"case": 3, "seed": 0})
    assert key == checkpoint_key(data_digest(manifest), {"seed": 0, "case": 3})
    assert key != checkpoint_key(data_digest(manifest), {"case": 3, "seed": 1})
    folder = checkpoint_dir(tmp_path / "out", key)
    # The first run stops after epoch 1 (as a kill after its checkpoint would leave it) ...
    first = train_case(
        replace(_job(setup, plan, _cfg(), tmp_path / "run-1"), checkpoint_dir=folder)
    )
    assert (folder / "pretrained.pt").is_file()
    # ... and the next one, in a run folder of its own, finds the checkpoint and goes on.
    cfg = TrainConfig(finetune_epochs=2, batch_size=32, num_workers=0)
    second = train_case(replace(_job(setup, plan, cfg, tmp_path / "run-2"), checkpoint_dir=folder))
    attempt = next(a for a in second.attempts if a["init"] == "pretrained")
    assert attempt["resumed_from_epoch"] == 1
    assert len(second.history) == 2 and second.history[0] == first.history[0]
    assert not (tmp_path / "run-2" / "checkpoints").exists()
    # Success: this key's folder goes; another, idle, goes once older than the limit.
    idle = checkpoint_dir(tmp_path / "out", "0" * 16)
    idle.mkdir()
    (idle / "pretrained.pt").write_bytes(b"")
    assert clean_checkpoints(tmp_path / "out", key) == [folder]
    assert clean_checkpoints(tmp_path / "out", None, stale_after_s=-1.0) == [idle]


def test_a_fine_tuned_runner_up_is_verified_at_its_own_size(setup, tmp_path: Path) -> None:
    """The frozen case's size was probed for frozen features; the fine-tune trains at the size
    its budget gives: the same images and the same nested split, other inputs."""
    from components.data.splits import load_splits
    from components.decision.verification import decide_verification, verify_runner_up
    from components.engine.extraction import ExtractionEngine

    manifest, backbone, prep, classes, _ = setup
    frozen, tuned = _plan(manifest, 2), _plan(manifest, 4)
    job = _job(setup, frozen, _cfg(), tmp_path)
    small = replace(prep, image_size=32)
    engine = ExtractionEngine(backbone, tmp_path / "cache", num_workers=0)
    own = load_splits(manifest, classes, engine, small)
    tuned_job = replace(job, train=own["train"], val=own["val"], prep=small)
    strategy = StrategyConfig(verify="on")
    decision = decide_verification(frozen, strategy, len(job.train.labels), 1, lambda: 100.0)
    result = verify_runner_up(job, tuned, decision, strategy, tuned_job)
    assert result.image_size == {2: 64, 4: 32}
    assert (
        load_model(tmp_path / "verification" / "case4" / "model.pt", backbone)[1].image_size == 32
    )
    assert (
        load_model(tmp_path / "verification" / "case2" / "model.pt", backbone)[1].image_size == 64
    )
    assert result.n_inner_val == round(0.2 * len(job.train.labels))
    assert "case 2 at 64 px scored" in result.sentence()
