"""The Great Expectations side of manifest validation, kept apart because GX's 1.x API moves fast.

Each run gets a throwaway in-memory context: creating one costs milliseconds, nothing leaks between
runs, and the only thing written to disk is the Data Docs site that a person may want to open.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

# Read by older GX releases at import time; 1.24 ships no analytics at all, the config flag below
# covers anything in between. Either way validation must never phone home.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import great_expectations as gx
import great_expectations.expectations as gxe
from great_expectations.core import ExpectationSuiteValidationResult
from great_expectations.data_context import AbstractDataContext
from great_expectations.data_context.types.base import (
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)

from components.common.config import ValidationConfig

logger = logging.getLogger(__name__)
# Logs the (empty) datasource list at INFO every time a context is made, i.e. every validation.
_chatty = logging.getLogger("great_expectations.datasource.fluent.config")
if _chatty.level == logging.NOTSET:
    _chatty.setLevel(logging.WARNING)

DOCS_SITE = "validation_site"
FILES_SUITE = "image-files"
DATASET_SUITE = "image-dataset"


def make_context(docs_dir: Path) -> AbstractDataContext:
    """An in-memory GX context whose only Data Docs site is ``docs_dir``.

    The stock ephemeral context would also build a second site in a temporary folder and draw
    progress bars on stderr for every validation; both are switched off here.
    """
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={
            DOCS_SITE: {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _tag(check: str, description: str) -> dict[str, Any]:
    # ``meta`` carries our key back through the result; ``description`` is what Data Docs shows.
    return {"meta": {"check": check}, "description": description}


def files_suite(cfg: ValidationConfig) -> gx.ExpectationSuite:
    """One expectation per row-level rule; a row failing any of them is quarantined."""
    allowed = sorted(cfg.allowed_formats)
    expectations = [
        gxe.ExpectColumnValuesToBeBetween(
            column="bytes", min_value=0, strict_min=True, **_tag("bytes", "bytes > 0 (not empty)")
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="decodable", value_set=[True], **_tag("decodable", "file decodes as an image")
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="format",
            value_set=allowed,
            **_tag("format", f"format in {{{', '.join(allowed)}}}"),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="width", min_value=cfg.min_width, **_tag("width", f"width >= {cfg.min_width} px")
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="height",
            min_value=cfg.min_height,
            **_tag("height", f"height >= {cfg.min_height} px"),
        ),
        gxe.ExpectColumnValuesToBeUnique(
            column="sha256", **_tag("unique", "no two files share the same content")
        ),
    ]
    suite = gx.ExpectationSuite(name=FILES_SUITE)
    for expectation in expectations:
        suite.add_expectation(expectation)
    return suite


def dataset_suite(classes: Iterable[str]) -> gx.ExpectationSuite:
    """Rules on the usable train rows: enough classes, and every class of the dataset among them."""
    suite = gx.ExpectationSuite(name=DATASET_SUITE)
    suite.add_expectation(
        gxe.ExpectColumnUniqueValueCountToBeBetween(
            column="label", min_value=2, **_tag("train_classes", "train covers at least 2 classes")
        )
    )
    suite.add_expectation(
        gxe.ExpectColumnDistinctValuesToContainSet(
            column="label",
            value_set=sorted(classes),
            **_tag("classes_in_train", "every class has usable train images"),
        )
    )
    return suite


def run_suite(
    context: AbstractDataContext, suite: gx.ExpectationSuite, frame: pd.DataFrame
) -> ExpectationSuiteValidationResult:
    """Validate ``frame`` (whole, as one batch) and keep the result in the context for Data Docs."""
    source = context.data_sources.add_pandas(f"{suite.name}-source")
    batch = source.add_dataframe_asset(suite.name).add_batch_definition_whole_dataframe("all")
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=suite.name, data=batch, suite=context.suites.add(suite))
    )
    # COMPLETE so unexpected_index_list names every failing row, not a sample of 20.
    return definition.run(batch_parameters={"dataframe": frame}, result_format="COMPLETE")


def results_by_check(result: ExpectationSuiteValidationResult) -> dict[str, Any]:
    """Map our check keys to their GX expectation results, refusing any that raised.

    A raising expectation has no unexpected rows, so trusting it would silently keep bad files.
    """
    checks = {}
    for res in result.results:
        check = res.expectation_config.meta["check"]
        error = (res.exception_info or {}).get("exception_message")
        if error:
            raise RuntimeError(f"Great Expectations check {check!r} raised: {error}")
        checks[check] = res
    return checks


def summarise(result: ExpectationSuiteValidationResult) -> list[tuple[str, bool, int, str]]:
    """(name, success, unexpected count, detail) per expectation, for a short human report."""
    rows = []
    for res in results_by_check(result).values():
        config, found = res.expectation_config, res.result
        count = found.get("unexpected_count", found.get("missing_count")) or 0
        sample = found.get("partial_unexpected_list") or found.get("partial_missing_list")
        detail = config.description or config.type
        if sample:
            values = sorted({str(v)[:12] for v in sample})  # full sha256 values flood a table
            detail += f"; e.g. {', '.join(values[:3])}"
        elif found.get("observed_value") is not None:
            detail += f"; observed {found['observed_value']}"
        name = f"{config.type}({config.kwargs['column']})"
        rows.append((name, bool(res.success), int(count), detail))
    return rows


def build_docs(context: AbstractDataContext, docs_dir: Path) -> Path | None:
    """Render Data Docs for this run only; a failure here must not fail the validation."""
    # Pages from an earlier run in the same folder would sit beside this one's and mislead.
    shutil.rmtree(docs_dir, ignore_errors=True)
    try:
        context.build_data_docs(site_names=[DOCS_SITE])
    except Exception as err:  # GX raises a zoo of types from its renderers
        logger.warning("could not build Great Expectations Data Docs in %s: %s", docs_dir, err)
        return None
    index = docs_dir / "index.html"
    if not index.is_file():
        logger.warning("Great Expectations Data Docs built no %s", index)
        return None
    return index
