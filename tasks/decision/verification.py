"""Verification task: check the rule's case against its runner-up when the budget allows."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.common.config import PipelineConfig
from components.common.plan import TransferPlan
from components.data.changes import PreviousRun
from components.data.counting import DatasetCounts
from components.data.scan import read_manifest
from components.data.splits import SplitData, load_splits
from components.decision import strategy, verification
from components.decision.costs import training_throughput
from components.engine.extraction import ExtractionEngine
from components.engine.images import Preprocessing
from components.similarity.scores import SimilarityReport
from components.training.cases import TrainingJob
from tasks.decision.resolution import finetune_input
from tasks.decision.strategy import publish_decision


def plan_verification(
    plan: TransferPlan,
    counts: DatasetCounts,
    prep: Preprocessing,
    engine: ExtractionEngine,
    cfg: PipelineConfig,
) -> verification.VerificationDecision:
    """Whether the runner-up will be checked, from a measured training rate (cached per machine)
    at the size the fine-tuned side trains at."""

    def rate() -> float:  # measured only when the cost decides: not when verification is off
        tuned = finetune_input(plan, counts, prep, engine, cfg) if plan.case in (1, 2) else None
        size = prep.image_size if tuned is None else tuned[0].image_size
        return training_throughput(
            engine.backbone, size, engine.device, engine.cache_root / "throughput.json"
        )

    n_train = counts.per_split.get("train", 0)
    return verification.decide_verification(
        plan, cfg.strategy, n_train, cfg.train.finetune_epochs, rate, counts.per_split.get("val", 0)
    )


def _runner_up_plan(
    train: SplitData, plan: TransferPlan, case: int, cfg: PipelineConfig
) -> TransferPlan:
    probe = plan.probe
    if case == 2 and probe is None and cfg.strategy.cut_block is None:
        probe = strategy.probe_cuts(train.features, train.labels, cfg.seed, groups=train.groups)
    return strategy.plan_for_case(plan, case, probe, cfg.strategy.cut_block)


def _at_finetune_size(
    runner_up: TransferPlan,
    plan: TransferPlan,
    counts: DatasetCounts,
    prep: Preprocessing,
    engine: ExtractionEngine,
    cfg: PipelineConfig,
) -> tuple[TransferPlan, Preprocessing]:
    """A fine-tuned runner-up of a frozen rule case, with the size it trains at, and why."""
    tuned = finetune_input(plan, counts, prep, engine, cfg) if runner_up.case in (3, 4) else None
    if tuned is None:
        return runner_up, prep
    tuned_prep, choice = tuned
    measured = dict(plan.resolution or {})
    resolution = {
        **choice.to_dict(),
        "reason": f"Fine-tuned at {choice.reason}",
        "frozen": {k: measured.get(k) for k in ("chosen", "method", "candidates", "reason")},
    }
    return replace(runner_up, resolution=resolution), tuned_prep


def _runner_up(
    usable_manifest: Path,
    counts: DatasetCounts,
    plan: TransferPlan,
    case: int,
    prep: Preprocessing,
    engine: ExtractionEngine,
    cfg: PipelineConfig,
) -> TransferPlan:
    splits = load_splits(read_manifest(usable_manifest), list(counts.classes), engine, prep)
    runner_up = _runner_up_plan(splits["train"], plan, case, cfg)
    return _at_finetune_size(runner_up, plan, counts, prep, engine, cfg)[0]


def preview_verification(
    plan: TransferPlan,
    counts: DatasetCounts,
    prep: Preprocessing,
    engine: ExtractionEngine,
    cfg: PipelineConfig,
    previous: PreviousRun | None,
) -> dict[str, object]:
    """What a run would do about verification (``plan``): reuse ``previous``'s verdict, or
    check the runner-up or not, and why."""
    reused = verification.reused_verdict(previous, plan, cfg.strategy)
    if reused is not None:
        return {**reused, "reason": verification.reuse_sentence(reused)}
    return plan_verification(plan, counts, prep, engine, cfg).to_dict()


@task(name="verify-case", cache_policy=NO_CACHE)
def verify_case(
    usable_manifest: Path,
    counts: DatasetCounts,
    similarity: SimilarityReport,
    plan: TransferPlan,
    prep: Preprocessing,
    engine: ExtractionEngine,
    cfg: PipelineConfig,
    run_dir: Path,
    previous: PreviousRun | None = None,
) -> TransferPlan:
    """The plan to train: the rule's, or the runner-up when it wins on a nested split (or won in
    ``previous``, when little changed since)."""
    logger = get_run_logger()
    reused = verification.reused_verdict(previous, plan, cfg.strategy)
    if reused is not None:
        logger.info(verification.reuse_sentence(reused))
        chosen = plan
        if reused["chosen_case"] != plan.case:
            chosen = _runner_up(
                usable_manifest, counts, plan, int(reused["chosen_case"]), prep, engine, cfg
            )
        final = replace(
            chosen,
            reason=f"{plan.reason} {verification.reuse_sentence(reused)}",
            verification=reused,
        )
        publish_decision(counts, similarity, final, run_dir)
        return final
    decision = plan_verification(plan, counts, prep, engine, cfg)
    if not decision.run:
        logger.info("verification skipped: %s", decision.reason)
        final = replace(
            plan,
            verification=decision.to_dict(),
            reason=f"{plan.reason} Not verified against case {decision.runner_up}: {decision.reason}.",
        )
        publish_decision(counts, similarity, final, run_dir)
        return final
    classes = list(counts.classes)
    manifest = read_manifest(usable_manifest)
    splits = load_splits(manifest, classes, engine, prep)
    train, val = splits["train"], splits["val"]
    runner_up = _runner_up_plan(train, plan, decision.runner_up, cfg)
    runner_up, runner_up_prep = _at_finetune_size(runner_up, plan, counts, prep, engine, cfg)
    job = TrainingJob(
        plan, engine.backbone, train, val, classes, cfg.train, prep, run_dir, cfg.seed
    )
    runner_up_job = None
    if runner_up_prep != prep:  # its own size: the same images, embedded at it for its probe head
        own = load_splits(manifest, classes, engine, runner_up_prep)
        runner_up_job = replace(job, train=own["train"], val=own["val"], prep=runner_up_prep)
    result = verification.verify_runner_up(job, runner_up, decision, cfg.strategy, runner_up_job)
    logger.info(result.sentence())
    chosen = plan if result.chosen_case == plan.case else runner_up
    final = replace(
        chosen, reason=f"{plan.reason} {result.sentence()}", verification=result.to_dict()
    )
    publish_decision(counts, similarity, final, run_dir)
    return final
