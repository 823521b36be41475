"""Multi-process fine-tuning: the torchrun worker, and the launcher that starts it.

The launcher writes a job file holding everything a worker needs, then runs::

    python -m torch.distributed.run --standalone --nproc_per_node N \\
        -m components.training.distributed_finetune --job JOB.json

Every worker rebuilds the network, calls ``finetune`` (which shares the data out between the
processes), and rank 0 writes the result and the best weights for the launcher to load back. The
checkpoint is the file a single-process fine-tune writes, so a retried launch resumes from it.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from components.engine.backbones import Backbone
from components.engine.images import Preprocessing
from components.training import distributed
from components.training.finetune import FinetuneResult, FinetuneSettings, RaceRule, finetune
from components.training.models import ModelSpec

log = logging.getLogger(__name__)


class DistributedFinetuneError(RuntimeError):
    """A torchrun fine-tuning job failed.

    Deliberately not a ``PipelineError``: a killed or crashed worker is worth a retry, and the retry
    resumes from the last epoch's checkpoint.
    """


@dataclass(frozen=True)
class DistributedJob:
    """One fine-tuning run as plain JSON values: written by the launcher, read by every worker."""

    backbone: str  # the registered name, for the record
    architecture: str  # the timm architecture the network is rebuilt from
    initial_weights: str  # state dict to start from (a checkpoint, when present, wins)
    spec: dict[str, Any]  # ModelSpec fields
    train_paths: list[str]
    train_labels: list[int]
    val_paths: list[str]
    val_labels: list[int]
    preprocessing: dict[str, Any]  # Preprocessing.to_dict()
    settings: dict[str, Any]  # FinetuneSettings fields
    checkpoint: str
    seed: int
    device: str  # "cpu": gloo; "cuda": nccl, one GPU per process
    result: str  # JSON rank 0 writes: FinetuneResult's fields, world_size, weight digests
    best_weights: str  # state dict rank 0 writes

    def write(self, path: Path) -> Path:
        _write_atomically(path, lambda tmp: tmp.write_text(json.dumps(asdict(self), indent=1)))
        return path

    @classmethod
    def read(cls, path: Path) -> DistributedJob:
        return cls(**json.loads(Path(path).read_text()))


def _write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp")
    write(tmp)
    tmp.replace(path)


def _settings(fields: dict[str, Any]) -> FinetuneSettings:
    """The settings back from the job file, the race rule (a nested record there) included."""
    race = fields.get("race")
    return FinetuneSettings(**{**fields, "race": None if race is None else RaceRule(**race)})


def _network(job: DistributedJob) -> nn.Module:
    # The initial weights hold the pre-trained body already, so the backbone's own weights file is
    # never needed here: the architecture gives the shape, the launcher's state dict the values.
    spec = ModelSpec(**job.spec)
    model = timm.create_model(job.architecture, pretrained=False, num_classes=spec.num_classes)
    model.load_state_dict(torch.load(job.initial_weights, map_location="cpu", weights_only=True))
    return model


def run_worker(job: DistributedJob) -> FinetuneResult:
    """One torchrun worker's share of ``job`` (or all of it, started without torchrun)."""
    device = distributed.init_from_env(job.device)
    try:
        model = _network(job)
        result = finetune(
            model,
            (job.train_paths, job.train_labels),
            (job.val_paths, job.val_labels),
            Preprocessing.from_dict(job.preprocessing),
            _settings(job.settings),
            Path(job.checkpoint),
            device,
            job.seed,
        )
        state = model.state_dict()
        digests = distributed.all_gather(distributed.state_digest(state))
        if distributed.is_main():
            _write_atomically(Path(job.best_weights), lambda tmp: torch.save(state, tmp))
            report = {
                **asdict(result),
                "world_size": distributed.world_size(),
                "state_sha256": digests,
            }
            _write_atomically(Path(job.result), lambda tmp: tmp.write_text(json.dumps(report)))
        distributed.barrier()  # no rank reports success before rank 0 has written the result
        return result
    finally:
        distributed.teardown()


def torchrun_command(job_path: Path, processes: int) -> list[str]:
    """The command line that runs ``job_path`` in ``processes`` workers on this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
        "-m",
        "components.training.distributed_finetune",
        "--job",
        str(job_path),
    ]


def _run(command: list[str], job_path: Path, processes: int) -> None:
    """Run torchrun, relaying its output line by line to this module's logger."""
    env = {
        # Progress bars are noise in a log; CPU workers share the cores instead of oversubscribing.
        "TQDM_DISABLE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes)),
        **os.environ,
    }
    tail: collections.deque[str] = collections.deque(maxlen=30)
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            log.info("%s", tail[-1])
        code = proc.wait()
    except BaseException:
        proc.terminate()  # torchrun passes it on to its workers
        proc.wait()
        raise
    if code != 0:
        raise DistributedFinetuneError(
            f"distributed fine-tuning job {job_path} failed: torchrun exited with code {code}; "
            "last output:\n" + "\n".join(tail)
        )


def launch_distributed(
    model: nn.Module,
    train: tuple[Sequence[str], Sequence[int]],
    val: tuple[Sequence[str], Sequence[int]],
    prep: Preprocessing,
    settings: FinetuneSettings,
    checkpoint: Path,
    device: torch.device,
    seed: int,
    *,
    backbone: Backbone,
    spec: ModelSpec,
    processes: int,
) -> FinetuneResult:
    """``finetune`` in ``processes`` torchrun workers; the best weights are loaded into ``model``.

    The job (the starting weights and a job file) is written next to ``checkpoint``.
    """
    folder = checkpoint.with_name(f"{checkpoint.stem}-distributed")
    folder.mkdir(parents=True, exist_ok=True)
    initial = folder / "initial.pt"
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _write_atomically(initial, lambda tmp: torch.save(state, tmp))
    (folder / "result.json").unlink(missing_ok=True)  # never read a previous attempt's result
    job = DistributedJob(
        backbone=backbone.name,
        architecture=backbone.architecture,
        initial_weights=str(initial),
        spec=asdict(spec),
        train_paths=list(train[0]),
        train_labels=[int(y) for y in train[1]],
        val_paths=list(val[0]),
        val_labels=[int(y) for y in val[1]],
        preprocessing=prep.to_dict(),
        settings=asdict(settings),
        checkpoint=str(checkpoint),
        seed=seed,
        device=device.type,
        result=str(folder / "result.json"),
        best_weights=str(folder / "best.pt"),
    )
    job_path = job.write(folder / "job.json")
    _run(torchrun_command(job_path, processes), job_path, processes)
    if not Path(job.result).is_file():
        raise DistributedFinetuneError(f"distributed fine-tuning job {job_path} wrote no result")
    report = json.loads(Path(job.result).read_text())
    model.load_state_dict(torch.load(job.best_weights, map_location="cpu", weights_only=True))
    model.to("cpu").eval()
    return FinetuneResult(
        val_accuracy=report["val_accuracy"],
        best_epoch=report["best_epoch"],
        history=tuple(report["history"]),
        resumed_from_epoch=report["resumed_from_epoch"],
        seconds=report["seconds"],
        samples_seen=tuple(report["samples_seen"]),
        raced=report.get("raced"),
        start_accuracy=report.get("start_accuracy"),
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One worker of a torchrun fine-tuning job.")
    parser.add_argument("--job", type=Path, required=True, help="job file written by the launcher")
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(  # rank 0 tells the story; the others speak up only when something is wrong
        level=logging.INFO if rank == "0" else logging.WARNING,
        format=f"%(asctime)s rank {rank} pid %(process)d %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    run_worker(DistributedJob.read(args.job))


if __name__ == "__main__":
    main()
