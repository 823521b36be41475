import json
from pathlib import Path

import torch

from components.decision import costs
from components.engine.backbones import load_backbone


def test_throughput_is_measured_once_per_size_and_read_back_from_the_cache(
    tmp_path: Path, monkeypatch
) -> None:
    backbone = load_backbone("efficientnet_lite0")
    cache = tmp_path / "throughput.json"
    steps: list[int] = []
    real_median = costs.statistics.median

    def counted(times: list[float]) -> float:
        steps.append(len(times))
        return real_median(times)

    monkeypatch.setattr(costs.statistics, "median", counted)
    small = costs.training_throughput(backbone, 32, torch.device("cpu"), cache)
    large = costs.training_throughput(backbone, 96, torch.device("cpu"), cache)
    assert small > 0 and large > 0
    # a median over at least three timed steps, never one step's luck
    assert len(steps) == 2 and all(n >= costs.TIMED_STEPS_MIN for n in steps)
    stored = json.loads(cache.read_text())
    assert sorted(k.split("|")[1] for k in stored) == ["32", "96"]
    assert costs.training_throughput(backbone, 32, torch.device("cpu"), cache) == small
    assert len(steps) == 2  # read back, not measured again
