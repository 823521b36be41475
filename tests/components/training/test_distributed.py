"""Multi-process fine-tuning through torchrun (gloo on CPU), and resuming after a worker is killed."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from components.common.errors import ConfigError
from components.engine.backbones import Backbone, load_backbone
from components.engine.images import Preprocessing
from components.training.distributed import resolve_processes, state_digest
from components.training.distributed_finetune import DistributedFinetuneError, launch_distributed
from components.training.finetune import FinetuneResult, FinetuneSettings, RaceRule
from components.training.models import ModelSpec, build_model

PREP = Preprocessing(32, (0.5,) * 3, (0.5,) * 3)
# The launcher logs the workers' output line by line under this name.
RELAY = "components.training.distributed_finetune"
Split = tuple[list[str], list[int]]


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return load_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def splits(digits_root: Path) -> tuple[Split, Split]:
    """30 training and 10 validation scans per digit: 150 training images for each of two ranks."""
    train: Split = ([], [])
    val: Split = ([], [])
    for digit in range(10):
        for i, path in enumerate(sorted((digits_root / str(digit)).glob("*.png"))):
            split = train if i < 30 else val
            split[0].append(str(path))
            split[1].append(digit)
    return train, val


def _settings(epochs: int) -> FinetuneSettings:
    # A random head on 32-pixel digits: one learning rate for every layer learns fastest.
    return FinetuneSettings(
        epochs=epochs,
        lr=3e-3,
        body_lr_factor=1.0,
        weight_decay=1e-4,
        label_smoothing=0.1,
        batch_size=15,
        num_workers=0,
        flip=False,
        keep_start=True,  # scored by both ranks before the first step
        race=RaceRule(after_epoch=0, behind=0.0, ahead=1.01),  # crosses the job file; never settles
    )


def _launch(
    backbone: Backbone, splits: tuple[Split, Split], epochs: int, checkpoint: Path
) -> tuple[torch.nn.Module, FinetuneResult]:
    spec = ModelSpec(backbone.name, 3, None, 10, "pretrained", PREP.image_size)
    torch.manual_seed(0)  # the new head's initial weights
    model = build_model(spec, backbone)
    result = launch_distributed(
        model,
        *splits,
        PREP,
        _settings(epochs),
        checkpoint,
        torch.device("cpu"),
        0,
        backbone=backbone,
        spec=spec,
        processes=2,
    )
    return model, result


def _report(checkpoint: Path) -> dict:
    return json.loads(
        (checkpoint.with_name(f"{checkpoint.stem}-distributed") / "result.json").read_text()
    )


def _relayed(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == RELAY and text in r.getMessage()]


def test_two_processes_share_the_data_and_end_with_identical_weights(
    backbone: Backbone,
    splits: tuple[Split, Split],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    checkpoint = tmp_path / "checkpoints" / "pretrained.pt"
    caplog.set_level(logging.INFO, logger=RELAY)
    model, result = _launch(backbone, splits, 2, checkpoint)
    report = _report(checkpoint)
    initial = torch.load(
        checkpoint.with_name("pretrained-distributed") / "initial.pt", weights_only=True
    )
    n_train = len(splits[0][0])

    assert report["world_size"] == 2
    # Each rank stepped on its own half of the training set in each of the two epochs.
    assert result.samples_seen == (n_train, n_train) and sum(result.samples_seen) == 2 * n_train
    written = _relayed(caplog, "checkpoint written after epoch")
    assert len(written) == 2 and all("rank 0 " in line for line in written)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 1 and saved["history"] == list(result.history)
    assert len(saved["rng_per_rank"]) == 2
    # Sharded validation summed over both ranks: a real accuracy, well above chance for ten digits.
    assert 0.2 < result.val_accuracy <= 1.0
    assert result.val_accuracy == max(h["val_accuracy"] for h in result.history)
    assert result.start_accuracy is not None and result.start_accuracy < result.val_accuracy
    assert result.raced is None and result.best_epoch >= 0
    # Both ranks ended with the same weights, the ones loaded back into the caller's model.
    first, second = report["state_sha256"]
    assert first == second == state_digest(model.state_dict()) != state_digest(initial)


class _EpochWatch(logging.Handler):
    """Sets ``started`` with rank 0's pid when the relayed output says ``epoch`` has begun."""

    def __init__(self, epoch: int, epochs: int) -> None:
        super().__init__()
        self.pattern = re.compile(rf"rank 0 pid (\d+) .*epoch {epoch}/{epochs} started")
        self.started = threading.Event()
        self.pid = 0

    def emit(self, record: logging.LogRecord) -> None:
        match = self.pattern.search(record.getMessage())
        if match and not self.started.is_set():
            self.pid = int(match.group(1))
            self.started.set()


def test_a_worker_killed_mid_epoch_is_resumed_from_its_checkpoint(
    backbone: Backbone,
    splits: tuple[Split, Split],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    checkpoint = tmp_path / "checkpoints" / "pretrained.pt"
    watch = _EpochWatch(epoch=2, epochs=3)
    relay = logging.getLogger(RELAY)
    relay.addHandler(watch)
    caplog.set_level(logging.INFO, logger=RELAY)
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(_launch, backbone, splits, 3, checkpoint)
            while not watch.started.wait(0.1) and not first.done():
                pass
            assert watch.started.is_set(), f"epoch 2 never started: {first.exception()!r}"
            assert checkpoint.is_file()
            os.kill(watch.pid, signal.SIGKILL)  # rank 0 dies inside epoch 2
            with pytest.raises(
                DistributedFinetuneError, match=r"job\.json failed: torchrun exited with code [1-9]"
            ):
                first.result()
    finally:
        relay.removeHandler(watch)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0  # the kill landed before epoch 2's checkpoint
    caplog.clear()

    _, resumed = _launch(backbone, splits, 3, checkpoint)  # what a Prefect retry does
    n_train = len(splits[0][0])
    assert resumed.resumed_from_epoch == 1
    assert resumed.history[0] == saved["history"][0] and len(resumed.history) == 3
    # Epoch 1 was not trained again: each rank stepped on its half for epochs 2 and 3 only.
    assert resumed.samples_seen == (n_train, n_train)
    assert not _relayed(caplog, "epoch 1/3 started") and len(_relayed(caplog, "/3 started")) == 2
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"] == 2
    first_rank, second_rank = _report(checkpoint)["state_sha256"]
    assert first_rank == second_rank


def test_process_count_follows_the_devices() -> None:
    cpu = torch.device("cpu")
    assert resolve_processes("auto", cpu) == 1
    assert resolve_processes(3, cpu) == 3  # CPU processes share the cores through gloo
    with pytest.raises(ConfigError, match=r"train\.processes"):
        resolve_processes(0, cpu)
    gpus = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=rf"{gpus} available"):
        resolve_processes(gpus + 1, torch.device("cuda"))
