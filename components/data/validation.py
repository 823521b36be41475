"""Decide which scanned files are usable and whether the dataset as a whole can be trained on.

A bad file is quarantined (listed, never touched on disk) so one corrupt JPEG does not stop a run;
only problems with the dataset as a whole (one class, too few images, too many rejects) fail it.
Row rules run as a Great Expectations suite so the evidence is a standard, browsable report.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from components.common.config import ValidationConfig
from components.common.errors import DataValidationError
from components.data import gx_suite
from components.data.scan import ScanSummary, read_manifest

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = {
    "path": "",
    "relpath": "",
    "label": "",
    "split": "",
    "bytes": 0,
    "sha256": "",
    "format": "",
    "width": 0,
    "height": 0,
    "mode": "",
    "decodable": False,
    "error": "",
}
_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
_MARKDOWN_FILES = 20


@dataclass(frozen=True)
class QuarantinedFile:
    path: str
    reason: str


@dataclass(frozen=True)
class ExpectationOutcome:
    name: str
    success: bool
    unexpected_count: int
    detail: str


@dataclass(frozen=True)
class ValidationReport:
    """What was kept, what was set aside and why, and whether the dataset can be trained on."""

    passed: bool
    n_files: int
    n_usable: int
    quarantined: tuple[QuarantinedFile, ...]
    failures: tuple[str, ...]
    expectations: tuple[ExpectationOutcome, ...]
    usable_manifest_path: Path
    json_path: Path
    docs_path: Path | None
    scan: ScanSummary | None = None  # layout, notes, clutter and skipped entries of the scan
    # What a later check on the images' content found (``near_duplicates``), once it has run.
    near_duplicates: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "n_files": self.n_files,
            "n_usable": self.n_usable,
            "failures": list(self.failures),
            "quarantined": [vars(q) for q in self.quarantined],
            "expectations": [vars(e) for e in self.expectations],
            "usable_manifest_path": str(self.usable_manifest_path),
            "json_path": str(self.json_path),
            "docs_path": None if self.docs_path is None else str(self.docs_path),
            "scan": None if self.scan is None else self.scan.to_dict(),
            "near_duplicates": self.near_duplicates,
        }

    def to_markdown(self) -> str:
        """A short report for a Prefect artifact: verdict, failures, checks, quarantined files."""
        verdict = "passed" if self.passed else "FAILED"
        lines = [
            f"## Data validation {verdict}",
            "",
            f"{self.n_files} files, {self.n_usable} usable, {len(self.quarantined)} quarantined.",
        ]
        if self.failures:
            lines += ["", "### Failures", "", *(f"- {f}" for f in self.failures)]
        if self.scan is not None:
            lines += ["", "### Scan", "", *(_cell(line) for line in self.scan.to_markdown())]
        lines += ["", "### Checks", "", "| check | ok | unexpected | detail |", "|---|---|---|---|"]
        for e in self.expectations:
            ok = "yes" if e.success else "**no**"
            lines.append(f"| {e.name} | {ok} | {e.unexpected_count} | {_cell(e.detail)} |")
        if self.near_duplicates is not None:
            lines += ["", "### Near-duplicates", "", *_near_duplicate_lines(self.near_duplicates)]
        if self.quarantined:
            lines += ["", f"### Quarantined files ({len(self.quarantined)})", ""]
            lines += ["| file | reason |", "|---|---|"]
            for q in self.quarantined[:_MARKDOWN_FILES]:
                lines.append(f"| {_cell(q.path)} | {_cell(q.reason)} |")
            if len(self.quarantined) > _MARKDOWN_FILES:
                more = len(self.quarantined) - _MARKDOWN_FILES
                lines.append(f"\n... and {more} more, listed in {self.json_path}")
        lines += ["", f"Full report: {self.json_path}"]
        if self.docs_path is not None:
            lines.append(f"Great Expectations Data Docs: {self.docs_path}")
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        """Stop the pipeline when the dataset as a whole is unusable; dirty files alone are not."""
        if not self.passed:
            reasons = "; ".join(self.failures)
            raise DataValidationError(
                f"dataset is not usable: {reasons} (report: {self.json_path})"
            )


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _near_duplicate_lines(found: dict[str, Any]) -> list[str]:
    lines = [
        f"{found['n_pairs']} near-duplicate pairs among {found['n_images']} images "
        f"({found['n_candidates']} candidates hashed): {found['n_cross_split']} across splits "
        f"({found['n_quarantined']} held-out files quarantined), "
        f"{found['n_label_conflicts']} label conflicts."
    ]
    if found.get("n_moved"):
        lines.append(
            f"{found['n_moved']} files moved so that each of {found['n_groups']} groups of "
            f"near-copies (at most {found['largest_group']} images) lies whole in one split."
        )
    if found.get("n_too_small"):
        lines.append(f"{found['n_too_small']} images too small to judge were not searched.")
    for pair in found["label_conflict_examples"]:
        lines.append(
            f"- label conflict: {_cell(pair['first'])} ({pair['first_label']}) and "
            f"{_cell(pair['second'])} ({pair['second_label']})"
        )
    if found.get("contact_sheet"):
        lines += ["", f"Contact sheet: {found['contact_sheet']}"]
    return lines


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"


def _normalise(manifest: pd.DataFrame) -> pd.DataFrame:
    """Fill gaps with the 'bad' value and fix dtypes so GX compares like with like."""
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing and len(manifest):
        raise ValueError(f"manifest lacks columns {missing}; expected {list(MANIFEST_COLUMNS)}")
    frame = manifest.reindex(columns=list(MANIFEST_COLUMNS)).reset_index(drop=True)
    for column, default in MANIFEST_COLUMNS.items():
        frame[column] = frame[column].fillna(default).astype(type(default))
    return frame


def _row_reasons(
    frame: pd.DataFrame, checks: dict[str, Any], cfg: ValidationConfig
) -> dict[int, str]:
    """One reason per failing row, naming the root cause rather than its consequences."""
    failed: dict[int, set[str]] = {}
    for check in ("bytes", "decodable", "format", "width", "height"):
        for index in checks[check].result.get("unexpected_index_list") or []:
            failed.setdefault(int(index), set()).add(check)
    reasons = {}
    for index, names in failed.items():
        row = frame.loc[index]
        error = f": {row['error']}" if row["error"] else ""
        if "bytes" in names:  # an empty file also fails every other check; say only this
            reasons[index] = row["error"] or "zero-byte file"
        elif "decodable" in names:
            reasons[index] = f"not decodable{error}"
        else:
            parts = []
            if "format" in names:
                allowed = ", ".join(sorted(cfg.allowed_formats))
                parts.append(
                    f"format {row['format'] or 'unknown'} not allowed (allowed: {allowed})"
                )
            if names & {"width", "height"}:
                size, minimum = (
                    f"{row['width']}x{row['height']}",
                    f"{cfg.min_width}x{cfg.min_height}",
                )
                parts.append(f"too small: {size} < {minimum}")
            reasons[index] = "; ".join(parts)
    return reasons


def _duplicate_reasons(frame: pd.DataFrame) -> dict[int, str]:
    """Keep one copy of each content; a copy outside train of a train file is leakage."""
    order = frame.assign(_rank=frame["split"].map(_SPLIT_ORDER).fillna(len(_SPLIT_ORDER)))
    order = order.sort_values(["_rank", "relpath"])
    reasons = {}
    for _, group in order[order.duplicated("sha256", keep=False)].groupby("sha256", sort=False):
        labels = sorted(group["label"].unique())
        if len(labels) > 1:
            reason = f"same content labelled {', '.join(labels[:-1])} and {labels[-1]}"
            reasons.update(dict.fromkeys(group.index, reason))
            continue
        keep = group.iloc[0]
        for index, row in group.iloc[1:].iterrows():
            if row["split"] == keep["split"]:
                reasons[index] = f"duplicate of {keep['relpath']}"
            else:
                reasons[index] = f"duplicate of {keep['split']} file {keep['relpath']} (leakage)"
    return reasons


def _dataset_failures(
    frame: pd.DataFrame, usable: pd.Series, cfg: ValidationConfig
) -> tuple[list[str], list[ExpectationOutcome]]:
    """Failures of the dataset as a whole, with the computed (non-GX) outcomes behind them."""
    classes = sorted(frame["label"].unique())
    train = frame["split"] == "train"
    usable_counts = frame[usable & train]["label"].value_counts()
    rejected_counts = frame[~usable & train]["label"].value_counts()
    failures, short = [], []
    in_train = set(frame.loc[train, "label"])
    for label in classes:
        n, rejected = int(usable_counts.get(label, 0)), int(rejected_counts.get(label, 0))
        if label not in in_train:
            splits = ", ".join(sorted(set(frame.loc[frame["label"] == label, "split"])))
            failures.append(f"class '{label}' appears in {splits} but not in train")
        elif n < cfg.min_images_per_class:
            note = f" ({rejected} more rejected)" if rejected else ""
            failures.append(
                f"class '{label}' has {n} usable train image{'' if n == 1 else 's'}, "
                f"below the minimum of {cfg.min_images_per_class}{note}"
            )
        if n < cfg.min_images_per_class:
            short.append(f"{label}: {n}")
    n_train_classes = len(usable_counts)
    if n_train_classes < 2:
        names = ", ".join(sorted(usable_counts.index)) or "none"
        failures.insert(
            0, f"train has usable images of {n_train_classes} class ({names}); at least 2 needed"
        )
    n_bad = int((~usable).sum())
    fraction = n_bad / len(frame)
    too_many = fraction > cfg.max_bad_fraction
    if too_many:
        failures.append(
            f"{n_bad} of {len(frame)} files rejected ({_pct(fraction)}), "
            f"above the limit {_pct(cfg.max_bad_fraction)}"
        )
    outcomes = [
        ExpectationOutcome(
            "images_per_class (computed)",
            not short,
            len(short),
            f"usable train images per class >= {cfg.min_images_per_class}"
            + (f"; short: {', '.join(short)}" if short else ""),
        ),
        ExpectationOutcome(
            "rejected_fraction (computed)",
            not too_many,
            n_bad,
            f"{n_bad} of {len(frame)} rejected ({_pct(fraction)}), "
            f"limit {_pct(cfg.max_bad_fraction)}",
        ),
    ]
    return failures, outcomes


def validate_manifest(
    manifest: pd.DataFrame, cfg: ValidationConfig, out_dir: Path, scan: ScanSummary | None = None
) -> ValidationReport:
    """Quarantine bad or duplicated files, judge the rest as a dataset, and write the evidence.

    Writes ``usable_manifest.csv``, ``validation.json`` and GX Data Docs under ``out_dir``; the
    scan's summary (``scan``), when given, goes into the report so it shows what was left out.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = _normalise(manifest)
    context = gx_suite.make_context(out_dir / "data_docs")
    files_result = gx_suite.run_suite(context, gx_suite.files_suite(cfg), frame)
    file_checks = gx_suite.results_by_check(files_result)
    reasons = _row_reasons(frame, file_checks, cfg)
    row_ok = ~frame.index.isin(list(reasons))
    reasons.update(_duplicate_reasons(frame[row_ok]))
    usable = pd.Series(~frame.index.isin(list(reasons)), index=frame.index)

    classes = sorted(frame["label"].unique())
    dataset_result = gx_suite.run_suite(
        context, gx_suite.dataset_suite(classes), frame[usable & (frame["split"] == "train")]
    )
    outcomes = [
        ExpectationOutcome(*summary)
        for result in (files_result, dataset_result)
        for summary in gx_suite.summarise(result)
    ]
    if frame.empty:
        failures = ["no images found"]
        outcomes.append(
            ExpectationOutcome("images_found (computed)", False, 0, "the manifest has no rows")
        )
    else:
        failures, computed = _dataset_failures(frame, usable, cfg)
        outcomes += computed

    usable_path = out_dir / "usable_manifest.csv"
    manifest.reset_index(drop=True)[usable.to_numpy()].to_csv(usable_path, index=False)
    report = ValidationReport(
        passed=not failures,
        n_files=len(frame),
        n_usable=int(usable.sum()),
        quarantined=tuple(
            QuarantinedFile(frame.at[i, "path"], reasons[i]) for i in sorted(reasons)
        ),
        failures=tuple(failures),
        expectations=tuple(outcomes),
        usable_manifest_path=usable_path,
        json_path=out_dir / "validation.json",
        docs_path=gx_suite.build_docs(context, out_dir / "data_docs"),
        scan=scan,
    )
    payload = {
        "report": report.to_dict(),
        "great_expectations": {
            "files": files_result.to_json_dict(),
            "dataset": dataset_result.to_json_dict(),
        },
    }
    report.json_path.write_text(json.dumps(payload, indent=2, default=str))
    logger.info(
        "validated %d files: %d usable, %d quarantined, %s",
        report.n_files,
        report.n_usable,
        len(report.quarantined),
        "passed" if report.passed else "failed: " + "; ".join(failures),
    )
    return report


def quarantine_more(
    report: ValidationReport,
    reasons: dict[str, str],
    section: dict[str, Any],
    usable_path: Path,
    moves: Mapping[str, str] | None = None,
    groups: Mapping[str, str] | None = None,
) -> ValidationReport:
    """The report after a later check quarantined more files (path -> reason) by content, moved
    others (path -> split) between the splits the pipeline drew, and keyed groups of near-copies
    (path -> key, the manifest's ``group`` column; empty for a file in no group).

    Writes the usable manifest without them to ``usable_path`` (the earlier file stays, as the
    input of the stages that ran before the check) and rewrites ``validation.json`` with the
    amended report and the check's ``section``, so the report stays the one list of what was left
    out and why.
    """
    manifest = read_manifest(report.usable_manifest_path)
    if moves:
        moved = manifest["path"].isin(list(moves)).to_numpy()
        manifest.loc[moved, "split"] = manifest.loc[moved, "path"].map(moves)
    if groups:
        manifest["group"] = manifest["path"].map(groups)
    keep = ~manifest["path"].isin(list(reasons))
    manifest[keep.to_numpy()].to_csv(usable_path, index=False)
    added = tuple(QuarantinedFile(p, reasons[p]) for p in sorted(reasons))
    amended = replace(
        report,
        n_usable=int(keep.sum()),
        quarantined=report.quarantined + added,
        usable_manifest_path=usable_path,
        near_duplicates=section,
    )
    payload = json.loads(report.json_path.read_text()) if report.json_path.is_file() else {}
    payload["report"] = amended.to_dict()
    report.json_path.write_text(json.dumps(payload, indent=2, default=str))
    return amended
