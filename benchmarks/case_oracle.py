"""Train every transfer case on one dataset and measure the pipeline's regret.

The size x similarity rule (plus budgeted verification) picks one case; this benchmark trains all
four with the pipeline's own recipe and reports each one's accuracy and wall time, the pipeline's
pick, and its regret: best accuracy minus the pick's. Case 4's pre-trained attempt is exactly case
3's training (same recipe, seed and data), so it resumes case 3's finished checkpoint and is charged
case 3's time; its random-initialisation fallback runs only when the pipeline's success criterion
says so, as in a real run.

    python benchmarks/case_oracle.py DATA [--per-class N] [--finetune-epochs E] [--image-size S]
        [--json OUT]

``--image-size S`` trains every case at S pixels (a resolution variant: run once per candidate
size, each under its own ``--name``); by default the pipeline measures the size as in a real run.

``--per-class N`` takes the first N images of every class (from DATA/train/<class> when DATA has a
train folder, else DATA/<class>) as links in the output folder; the source is never touched.
Results per case are cached in the output folder, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from prefect import flow
from subsets import class_files, link_range

from components.common.config import load_config
from components.data.scan import read_manifest
from components.data.splits import load_splits
from components.decision import strategy
from components.training import evaluation
from components.training.cases import TrainingJob, train_case
from components.training.models import load_model
from flows.cli import start_prefect_api_early
from flows.transfer import Decision, StageClock, decide, owned_run, verified
from tasks.decision.resolution import finetune_input


def subset(source: Path, per_class: int, dest: Path) -> Path:
    """DEST/<class>/ with links to the first ``per_class`` images of every class."""
    link_range(class_files(source), dest, 0, per_class)
    return dest


@flow(name="case-oracle-decision")
def pipeline_decision(data: str, config: Any) -> tuple[Decision, strategy.TransferPlan]:
    """The pipeline's own decision: the rule's case, then budgeted verification."""
    with owned_run(data, config) as ctx:
        d = decide(ctx, config, StageClock())
        final = verified(d, config)
    return d, final


def _accuracy(model_path: Path, split: Any, engine: Any, prep: Any, cfg: Any) -> float:
    model, spec, _ = load_model(model_path, engine.backbone)
    logits = evaluation.model_logits(model, spec.cut, split, prep, engine, cfg.train.batch_size)
    return float((logits.argmax(1) == split.labels).mean())


def train_every_case(d: Decision, cfg: Any, out: Path) -> list[dict[str, Any]]:
    """Each case trained with the pipeline's recipe; results cached per case in ``out``."""
    backbone = d.engine.backbone
    classes = list(d.counts.classes)
    manifest = read_manifest(d.validation.usable_manifest_path)
    splits = load_splits(manifest, classes, d.engine, d.prep)
    train, test = splits["train"], splits.get("test")
    probe = d.plan.probe
    if probe is None and cfg.strategy.cut_block is None:
        probe = strategy.probe_cuts(train.features, train.labels, cfg.seed)
    # Fine-tuned cases train at the size the pipeline gives a fine-tune (its budget's choice when
    # the size was probed for a frozen case), with the probe head fitted at that size.
    tuned = finetune_input(d.plan, d.counts, d.prep, d.engine, cfg)
    tuned_prep = d.prep if tuned is None else tuned[0]
    tuned_splits = splits if tuned is None else load_splits(manifest, classes, d.engine, tuned_prep)
    rows = []
    for case in (1, 2, 3, 4):
        cached = out / f"case{case}.json"
        if cached.is_file():
            rows.append(json.loads(cached.read_text()))
            continue
        plan = strategy.plan_for_case(d.plan, case, probe, cfg.strategy.cut_block)
        run_dir = out / ("finetune" if case in (3, 4) else f"case{case}")
        prep, on = (tuned_prep, tuned_splits) if case in (3, 4) else (d.prep, splits)
        job = TrainingJob(
            plan, backbone, on["train"], on["val"], classes, cfg.train, prep, run_dir, cfg.seed
        )
        print(f"training case {case} ...", flush=True)
        start = time.perf_counter()
        result = train_case(job)
        seconds = time.perf_counter() - start
        if case == 4:  # its pre-trained attempt resumed case 3's checkpoint: charge case 3's time
            seconds += next(r["seconds"] for r in rows if r["case"] == 3)
        row = {
            "case": case,
            "cut": plan.cut,
            "val_accuracy": result.val_accuracy,
            "test_accuracy": None
            if test is None
            else _accuracy(result.model_path, on["test"], d.engine, prep, cfg),
            "image_size": prep.image_size,
            "seconds": round(seconds, 1),
            "attempts": list(result.attempts),
        }
        cached.write_text(json.dumps(row, indent=1, default=str))
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
    return rows


def table(rows: list[dict[str, Any]], pick: int) -> str:
    lines = [
        "| case | cut | px | val accuracy | test accuracy | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        test = "-" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}"
        mark = " **(pick)**" if r["case"] == pick else ""
        lines.append(
            f"| {r['case']}{mark} | {r['cut'] or '-'} | {r.get('image_size', '-')} "
            f"| {r['val_accuracy']:.4f} | {test} | {r['seconds']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--per-class", type=int, default=None)
    parser.add_argument("--finetune-epochs", type=int, default=None)
    parser.add_argument("--verify", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--name", default=None)
    parser.add_argument("--output-dir", type=Path, default=Path("transfer-runs/oracle"))
    parser.add_argument("--image-size", type=int, default=None, help="default: the pipeline's")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    # Prefect's own temporary server would outlive a killed benchmark; ours dies with it.
    if (booting := start_prefect_api_early()) is not None:
        booting.join()

    name = args.name or (
        args.data.name + (f"-{args.per_class}-per-class" if args.per_class else "")
    )
    out = (args.output_dir / name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = subset(args.data, args.per_class, out / "data") if args.per_class else args.data
    overrides: dict[str, Any] = {
        "output_dir": str(args.output_dir),
        "data.name": name,
        "strategy.verify": args.verify,
        # --per-class builds the subset as links to the source files, outside the data folder
        "data.follow_external_links": True,
    }
    if args.image_size:
        overrides["train.image_size"] = args.image_size
    if args.finetune_epochs:
        overrides["train.finetune_epochs"] = args.finetune_epochs
    cfg = load_config(None, overrides)

    start = time.perf_counter()
    decision, final = pipeline_decision(str(data), cfg)
    decide_seconds = time.perf_counter() - start
    rows = train_every_case(decision, cfg, out / "cases")
    best = max(rows, key=lambda r: r["val_accuracy"])
    picked = next(r for r in rows if r["case"] == final.case)
    result = {
        "dataset": name,
        # the folder's name, not its path: results are shared, the machine's layout is not
        "data": args.data.name + (f", first {args.per_class} per class" if args.per_class else ""),
        "counts": {"total": decision.counts.total, "per_split": decision.counts.per_split},
        "min_train_per_class": decision.counts.min_train_per_class,
        "image_size": decision.prep.image_size,
        "similarity": decision.similarity.score,
        "similarity_interval": [decision.similarity.low, decision.similarity.high],
        "rule_case": decision.plan.case,
        "verification": final.verification,
        "pick": final.case,
        "reason": final.reason,
        "best_case": best["case"],
        "regret": round(best["val_accuracy"] - picked["val_accuracy"], 4),
        "decision_seconds": round(decide_seconds, 1),
        "resolution": final.resolution,
        "finetune_epochs": cfg.train.finetune_epochs,
        "cases": rows,
        "table": table(rows, final.case),
    }
    print(f"\n{name}: rule case {decision.plan.case}, pick case {final.case}")
    print(result["table"])
    print(f"regret (best val accuracy - pick's): {result['regret']:.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
