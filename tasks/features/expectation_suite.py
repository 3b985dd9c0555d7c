"""Running a Great Expectations suite on a Parquet snapshot in bounded memory.

GX's pandas engine checks a frame in memory, and a snapshot of ten million rows by fifty columns is ~4 GiB as one
frame. So the suite is split by what each expectation reads (:func:`plan_reads`), and each part runs on a frame of
only those columns:

* an expectation on a column (or a pair, or a list) reads those columns, all rows, plus the columns its
  ``row_condition`` names;
* a row count reads no column (a frame of only an index);
* the table's columns (their count, names and order, ``expect_column_to_exist``) read no row;
* anything else on the table reads every column (no shipped check does; a declared one may).

The parts' results are merged back into one suite result in suite order, stored once and rendered as one Data
Docs page, so the report is the one a single whole-frame run gives. A snapshot smaller than ``whole_frame_bytes``
(uncompressed) is read whole in one part: the same results with one GX run instead of one per column.

Why by columns and not by record batches: most expectations are not sums over rows (uniqueness, means,
quantiles, ``mostly`` over the whole column, increasing values), and merging per-batch results would mean
re-deriving each one's rule outside GX. A column of ten million rows is 80 MB of floats.

``great_expectations`` is imported lazily (about 2 s), so importing this module stays cheap.
"""

from __future__ import annotations

import datetime
import difflib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kiln.tasks.features.expectation_report import REPORT_EXAMPLES, kwargs_problems
from kiln.tasks.spec import ExpectationSpec

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow.parquet as pq

log = logging.getLogger(__name__)

#: Below this uncompressed size a snapshot is checked as one frame.
WHOLE_FRAME_BYTES = 256 << 20
#: Expectations on the table that need only its row count.
ROW_COUNT_TYPES = frozenset({"expect_table_row_count_to_be_between", "expect_table_row_count_to_equal"})
#: Expectations on the table that need only its columns' names and order.
SCHEMA_TYPES = frozenset({"expect_column_to_exist", "expect_table_columns_to_match_ordered_list",
                          "expect_table_columns_to_match_set", "expect_table_column_count_to_be_between",
                          "expect_table_column_count_to_equal"})
#: The kwargs that name the columns an expectation reads (GX's column, column-pair and multicolumn domains).
_COLUMN_KWARGS = ("column", "column_A", "column_B", "column_list")
_SITE = "kiln"
_SUITE = "data_quality"
_PLACE = "kiln_place"
#: Expectation fields that GX fills in itself; not offered as kwargs in error messages.
_INTERNAL_FIELDS = {"id", "rendered_content", "batch_id", "windows"}

Rows = Literal["all", "none"]


@dataclass(frozen=True)
class Read:
    """What one part of the suite reads: some columns of all rows, or the columns' names alone."""

    columns: tuple[str, ...]
    """The columns, in file order (empty: an index of every row, or with ``rows="none"`` the file's columns)."""
    rows: Rows = "all"
    """``"none"``: a frame with every column and no rows (names, order and dtypes only)."""
    whole: bool = False
    """Every column and every row."""


def check_expectations(specs: list[ExpectationSpec], where: str = "expectations.declared") -> list[Any]:
    """Turn specs into GX expectation objects, rejecting unknown types and bad kwargs.

    Args:
        specs: the expectations.
        where: the spec field that holds ``specs``, for error messages (``expectations.declared[2]``).

    Returns:
        ``great_expectations.expectations.Expectation`` instances, one per spec.

    Raises:
        ValueError: an unknown expectation type (with the closest valid one) or invalid kwargs (naming the
            expectation, the bad kwarg and the allowed ones).
    """
    import_gx()
    from great_expectations.expectations.registry import (
        get_expectation_impl,
        list_registered_expectation_implementations,
    )

    known = sorted(list_registered_expectation_implementations())
    out = []
    for i, spec in enumerate(specs):
        if spec.type not in known:
            close = difflib.get_close_matches(spec.type, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"{where}[{i}] '{spec.type}': unknown expectation type{hint} "
                             "See https://greatexpectations.io/expectations for the valid types")
        cls = get_expectation_impl(spec.type)
        try:
            out.append(cls(**spec.kwargs))
        except (ValueError, TypeError) as exc:
            allowed = [f for f in cls.__fields__ if f not in _INTERNAL_FIELDS]
            raise ValueError(f"{where}[{i}] '{spec.type}': invalid kwargs {spec.kwargs}: "
                             f"{kwargs_problems(exc, allowed)}. Allowed kwargs: {', '.join(allowed)}") from None
    return out


def plan_reads(specs: list[ExpectationSpec], columns: list[str], whole: bool = False) -> dict[Read, list[int]]:
    """Which expectations (by index in ``specs``) run on which read of the snapshot.

    Args:
        specs: the suite, already checked (:func:`check_expectations`).
        columns: the snapshot's columns, in file order.
        whole: read the whole snapshot once for every expectation.

    Returns:
        The reads in first-use order, each with its expectations in suite order.
    """
    plan: dict[Read, list[int]] = {}
    for i, spec in enumerate(specs):
        read = Read((), whole=True) if whole else _read_of(spec, columns)
        plan.setdefault(read, []).append(i)
    return plan


def _read_of(spec: ExpectationSpec, columns: list[str]) -> Read:
    if spec.type in SCHEMA_TYPES:
        return Read((), rows="none")
    named: set[str] = set()
    for key in _COLUMN_KWARGS:
        value = spec.kwargs.get(key)
        named.update([value] if isinstance(value, str) else value if isinstance(value, list) else [])
    condition = spec.kwargs.get("row_condition")
    if condition:  # a pandas query or a Condition as data: a column named in it is read too (a false match costs
        text = condition if isinstance(condition, str) else json.dumps(condition)  # memory, not correctness)
        named.update(c for c in columns if c in text)
    if not named and spec.type not in ROW_COUNT_TYPES:
        return Read((), whole=True)
    # A column that is not in the data is left out: GX then reports it missing, as on the whole frame.
    return Read(tuple(c for c in columns if c in named))


def run_suite(snapshot: Path, specs: list[ExpectationSpec], docs_dir: Path,
              whole_frame_bytes: int = WHOLE_FRAME_BYTES) -> Any:
    """Check ``specs`` on the Parquet file ``snapshot``, one read at a time (see the module docstring); build Data
    Docs for the merged result in ``docs_dir``.

    Args:
        snapshot: the Parquet file.
        specs: the suite, already checked (:func:`check_expectations`).
        docs_dir: where the Data Docs site is written.
        whole_frame_bytes: below this uncompressed size the file is read whole, once.

    Returns:
        The merged ``ExpectationSuiteValidationResult``, its results in the order of ``specs`` (GX's own order
        groups them by column).
    """
    import pyarrow.parquet as pq

    gx = import_gx()
    from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResult
    from great_expectations.validator.v1_validator import Validator
    from great_expectations.validator.validation_statistics import calc_validation_statistics

    context = _context(gx, docs_dir)
    batch_def = (context.data_sources.add_pandas(name="snapshot").add_dataframe_asset(name="snapshot")
                 .add_batch_definition_whole_dataframe("whole"))
    pf = pq.ParquetFile(snapshot)
    size = sum(pf.metadata.row_group(i).total_byte_size for i in range(pf.metadata.num_row_groups))
    plan = plan_reads(specs, pf.schema_arrow.names, whole=size < whole_frame_bytes)
    results: list[Any] = [None] * len(specs)
    meta: dict[str, Any] = {}
    batch_id = None
    for n, (read, indices) in enumerate(plan.items(), 1):
        frame = _frame(snapshot, pf, read)
        log.info("checking %d expectations on %s (%d of %d reads)", len(indices), _describe(read), n, len(plan))
        validator = Validator(batch_definition=batch_def, batch_parameters={"dataframe": frame}, result_format={
            "result_format": "SUMMARY", "partial_unexpected_count": REPORT_EXAMPLES})
        # GX orders results its own way (by column); a mark in each one's meta finds its place, then goes.
        marked = [ExpectationSpec(type=specs[i].type, kwargs={
            **specs[i].kwargs, "meta": {**specs[i].kwargs.get("meta", {}), _PLACE: i}}) for i in indices]
        part = validator.validate_expectation_suite(
            gx.ExpectationSuite(name=_SUITE, expectations=check_expectations(marked, "suite")))
        del frame, validator
        for result in part.results:
            config = result.expectation_config
            if config is None:  # GX fills it in for every result of a suite it ran
                raise RuntimeError(f"Great Expectations returned a result without its expectation: {result}")
            results[config.meta.pop(_PLACE)] = result
        meta = meta or dict(part.meta)
        batch_id = batch_id or part.batch_id
    stats = calc_validation_statistics(results)
    merged = ExpectationSuiteValidationResult(
        results=results, success=stats.success, suite_name=_SUITE, meta=meta, batch_id=batch_id, statistics={
            "evaluated_expectations": stats.evaluated_expectations,
            "successful_expectations": stats.successful_expectations,
            "unsuccessful_expectations": stats.unsuccessful_expectations, "success_percent": stats.success_percent})
    _write_docs(gx, context, merged, specs)
    return merged


def _frame(path: Path, pf: pq.ParquetFile, read: Read) -> pd.DataFrame:
    import pandas as pd

    from kiln.tasks.features.batches import empty_frame

    if read.rows == "none":
        return empty_frame(pf)
    if read.whole:
        return pd.read_parquet(path)
    if not read.columns:
        return pd.DataFrame(index=pd.RangeIndex(pf.metadata.num_rows))
    return pf.read(columns=list(read.columns), use_threads=True).to_pandas()


def _describe(read: Read) -> str:
    if read.whole:
        return "the whole snapshot"
    if read.rows == "none":
        return "the columns' names"
    return f"columns {', '.join(read.columns)}" if read.columns else "the row count"


def import_gx() -> Any:
    """``great_expectations``, imported with its usage analytics off (the workers may have no network)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    return gx


def _context(gx: Any, docs_dir: Path) -> Any:
    """An ephemeral GX context whose only Data Docs site is ``docs_dir``."""
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    # The default site of an ephemeral context writes to a random temp folder; only ours is wanted.
    for name in list(context.list_data_docs_sites()):
        context.delete_data_docs_site(name)
    context.add_data_docs_site(_SITE, {
        "class_name": "SiteBuilder",
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
    })
    return context


def _write_docs(gx: Any, context: Any, result: Any, specs: list[ExpectationSpec]) -> None:
    """Store ``result`` and the suite in ``context`` and render them, as a checkpoint's Data Docs action does."""
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    context.suites.add(gx.ExpectationSuite(name=_SUITE, expectations=check_expectations(specs, "suite")))
    run_id = RunIdentifier(run_time=datetime.datetime.now(datetime.UTC))
    result.meta.update(run_id=run_id, validation_time=run_id.run_time)
    suite_id = ExpectationSuiteIdentifier(name=_SUITE)
    result_id = ValidationResultIdentifier(batch_identifier=result.batch_id, expectation_suite_identifier=suite_id,
                                           run_id=run_id)
    context.validation_results_store.store_validation_results(
        suite_validation_result=result, suite_validation_result_identifier=result_id,
        expectation_suite_identifier=suite_id)
    context.build_data_docs(site_names=[_SITE], resource_identifiers=[result_id, suite_id])
