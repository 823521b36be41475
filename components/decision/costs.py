"""What a fine-tune will cost here, measured on this machine rather than guessed.

Budgeted decisions (whether to verify the runner-up case) need seconds, not FLOPs: the same network
trains at 220 images/s at 64 px and 7.6 images/s at 224 px on a 2-core CPU, and a GPU is another
world. The median of a few training steps on random tensors gives the rate; it is cached per
backbone, resolution, device and thread count, so only the first run on a machine pays for it.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import torch

from components.engine.backbones import Backbone, fresh_model

log = logging.getLogger(__name__)

# A frozen case fits a linear head on cached features: seconds, whatever the data size.
FROZEN_CASE_SECONDS = 5.0
# Timed training steps: at least the minimum, then more until about a second has passed.
TIMED_STEPS_MIN, TIMED_STEPS_MAX, TIMED_SECONDS = 3, 15, 1.0


def training_throughput(
    backbone: Backbone, image_size: int, device: torch.device, cache_file: Path, batch: int = 8
) -> float:
    """Training images per second for the whole network at ``image_size`` (cached)."""
    key = f"{backbone.name}|{image_size}|{device.type}|{torch.get_num_threads()}|{batch}"
    cached = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    if key in cached:
        return float(cached[key])
    model = fresh_model(backbone, 10, copy_backbone=False).to(device).train()
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> float:
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step()  # the first step warms up allocators and kernels
    # The median of several steps: one step pre-empted by another process (a shared machine) would
    # otherwise set the rate, and every budgeted decision after it reads this cache.
    times = [step() for _ in range(TIMED_STEPS_MIN)]
    while len(times) < TIMED_STEPS_MAX and sum(times) < TIMED_SECONDS:
        times.append(step())
    rate = batch / statistics.median(times)
    cached[key] = rate
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(cached, indent=1))
    log.info("training throughput at %d px on %s: %.1f images/s", image_size, device, rate)
    return rate


def finetune_seconds(n_train: int, n_val: int, epochs: int, images_per_second: float) -> float:
    """Estimated wall time of a fine-tune: training passes plus evaluation (about 3x cheaper)."""
    return epochs * (n_train + n_val / 3) / images_per_second


def case_seconds(
    case: int, n_train: int, n_val: int, epochs: int, images_per_second: float
) -> float:
    """Estimated cost of training ``case`` (case 4 counted without its random-init fallback)."""
    if case in (1, 2):
        return FROZEN_CASE_SECONDS
    return finetune_seconds(n_train, n_val, epochs, images_per_second)
