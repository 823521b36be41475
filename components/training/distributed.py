"""The few ``torch.distributed`` helpers fine-tuning needs, all no-ops in a single process.

Fine-tuning code calls these unconditionally, so one code path serves a plain call and a torchrun
worker alike: without an initialised process group (or with one process) every helper returns what
a single process would have.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from components.common.errors import ConfigError

T = TypeVar("T")


def resolve_processes(setting: int | Literal["auto"], device: torch.device) -> int:
    """Fine-tuning processes: ``auto`` is one per CUDA GPU when there are several, else one."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if setting == "auto":
        return gpus if gpus > 1 else 1
    if setting < 1:
        raise ConfigError(f"train.processes must be 1 or more, or 'auto' (got {setting})")
    if device.type == "cuda" and setting > gpus:
        raise ConfigError(
            f"train.processes={setting} needs one CUDA GPU per process; {gpus} available"
        )
    return setting


def init_from_env(device_type: str) -> torch.device:
    """Join the process group torchrun describes in the environment; return this process's device.

    gloo on CPU, nccl on CUDA with one GPU per local rank. Without torchrun's variables (or with a
    world of one) nothing is initialised and the process trains alone.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            device_id=device if device.type == "cuda" else None,
        )
    return device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """Whether this process writes files and logs progress (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` when distributed (it averages the gradients)."""
    if not is_distributed():
        return model
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def train_sampler(dataset: Dataset, seed: int) -> DistributedSampler | None:
    """This process's seeded shuffle of its share of ``dataset``; ``None`` in a single process."""
    if not is_distributed():
        return None
    return DistributedSampler(
        dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reshuffle a distributed sampler: without this every epoch repeats the first one's order."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)


def shard(items: Sequence[T]) -> list[T]:
    """Every ``world_size``-th item from this rank's offset: disjoint shards that cover ``items``."""
    return list(items[rank() :: world_size()])


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Sum numbers over processes, so every process takes its decisions on the same totals."""
    if not is_distributed():
        return list(values)
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals.tolist()


def all_gather(value: T) -> list[T]:
    """Every process's ``value`` (any picklable object), in rank order, on every process."""
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every process."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every process.

    DDP broadcasts buffers before each training forward, so after the last step of an epoch each
    process holds statistics updated by its own batch; validation and saved weights need one copy.
    """
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names and tensor bytes: equal digests mean identical weights."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()
