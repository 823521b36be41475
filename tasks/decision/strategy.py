"""Case-selection task: the size x similarity rule, a probe for the frozen cases' cut, the report."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from components.common.config import PipelineConfig
from components.common.plan import TransferPlan
from components.data.counting import DatasetCounts
from components.data.scan import read_manifest
from components.data.splits import load_splits
from components.decision import strategy
from components.decision.reporting import decision_markdown, plot_probe
from components.engine.extraction import ExtractionEngine
from components.engine.images import Preprocessing
from components.similarity.scores import SimilarityReport


@task(name="select-case", cache_policy=NO_CACHE)
def select_case(
    usable_manifest: Path,
    counts: DatasetCounts,
    similarity: SimilarityReport,
    prep: Preprocessing,
    engine: ExtractionEngine,
    cfg: PipelineConfig,
    run_dir: Path,
    resolution: dict[str, object] | None = None,
) -> TransferPlan:
    """Decide the case (and cut), write the decision report and publish it."""
    probe = None
    if strategy.needs_probe(counts, similarity, cfg.strategy):
        manifest = read_manifest(usable_manifest)
        train = load_splits(manifest, list(counts.classes), engine, prep)["train"]
        prefer = strategy.probe_preference(similarity, cfg.strategy)
        probe = strategy.probe_cuts(
            train.features, train.labels, cfg.seed, prefer, groups=train.groups
        )
    plan = replace(
        strategy.select_case(counts, similarity, cfg.strategy, probe), resolution=resolution
    )
    publish_decision(counts, similarity, plan, run_dir)
    get_run_logger().info(plan.reason)
    return plan


def publish_decision(
    counts: DatasetCounts,
    similarity: SimilarityReport,
    plan: TransferPlan,
    run_dir: Path,
) -> None:
    """Write ``decision.md`` and the probe plot, and publish the report as a Prefect artifact."""
    report = decision_markdown(counts, similarity, plan)
    (run_dir / "decision.md").write_text(report)
    plot_probe(plan, run_dir / "probe.png")
    create_markdown_artifact(
        key="decision-report", markdown=report, description=f"case {plan.case}"
    )
