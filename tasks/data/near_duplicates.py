"""Near-duplicate task: where the pipeline drew the splits, each group of copies is moved whole
into one split; copies still across splits are quarantined from the held-out side, copies across
labels reported. Read from the features the embedding stage has just cached."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from components.common.config import DataConfig, ValidationConfig
from components.data import near_duplicates, validation
from components.data.contact_sheet import write_contact_sheet
from components.data.scan import read_manifest
from components.engine.extraction import ExtractionEngine
from components.engine.images import Preprocessing

SHEET = "near_duplicates.png"
USABLE = "usable_manifest_deduplicated.csv"


def _sheet(found: near_duplicates.NearDuplicates, path: Path, cfg: ValidationConfig) -> Path | None:
    """Leaks first, then label conflicts, then the rest, up to the configured number of pairs."""
    order = sorted(found.pairs, key=lambda p: (not p.cross_split, not p.label_conflict))
    shown = order[: cfg.near_duplicate_sheet_pairs]
    if not shown:
        return None
    captions = [
        (
            p.first,
            p.second,
            f"{p.first_split}/{p.first_label} | {p.second_split}/{p.second_label}\n{p.describe()}",
        )
        for p in shown
    ]
    return write_contact_sheet(captions, path, cfg.max_image_pixels)


@task(name="near-duplicates", cache_policy=NO_CACHE)
def quarantine_near_duplicates(
    report: validation.ValidationReport,
    prep: Preprocessing,
    engine: ExtractionEngine,
    cfg: ValidationConfig,
    data: DataConfig,
    seed: int,
) -> validation.ValidationReport:
    """The validation report with near-copy groups whole in one split where the pipeline drew
    the splits, and held-out near-copies of other splits' images quarantined.

    Runs after the embedding at ``prep``, so every row it reads is already cached: the search costs
    one matrix product and the hashes of its candidates, no forward pass.
    """
    logger = get_run_logger()
    if not cfg.near_duplicates:
        return report
    manifest = read_manifest(report.usable_manifest_path)
    head = engine.backbone.cut_points[-1]
    features = engine.features(manifest["path"].tolist(), manifest["sha256"].tolist(), prep)[head]
    found = near_duplicates.find_near_duplicates(manifest, features, cfg)
    out_dir = report.json_path.parent
    drawn = report.scan is not None and report.scan.layout == "classes"
    placed = near_duplicates.place_copies(manifest, found, cfg, data, seed, drawn)
    found = placed.found
    if placed.moves:
        logger.info(
            "%d files moved so that each of %d near-copy groups lies whole in one split",
            len(placed.moves),
            placed.n_groups,
        )
    amended = validation.quarantine_more(
        report,
        found.quarantined,
        placed.section(_sheet(found, out_dir / SHEET, cfg)),
        out_dir / USABLE,
        placed.moves,
        placed.groups,
    )
    for p in found.label_conflicts[:20]:
        logger.warning(
            "label conflict: %s (%s) and %s (%s) are near-duplicates (%s)",
            p.first, p.first_label, p.second, p.second_label, p.describe(),
        )  # fmt: skip
    for path, reason in list(found.quarantined.items())[:20]:
        logger.warning("quarantined %s: %s", path, reason)
    logger.info(
        "%d near-duplicate pairs (%d candidates): %d quarantined, %d label conflicts",
        len(found.pairs),
        found.n_candidates,
        len(found.quarantined),
        len(found.label_conflicts),
    )
    create_markdown_artifact(key="validation-report", markdown=amended.to_markdown())
    return amended
