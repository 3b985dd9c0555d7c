"""The ``clean`` step: turn the ingested snapshot into typed, complete rows that ``build_features`` can use.

Rules run in this order; each one that does something is logged as one line and recorded in the report:

1. ``drop_ignored``: drop columns typed ``ignore``.
2. ``coerce_numeric`` / ``coerce_categorical``: numeric columns through ``pd.to_numeric(errors="coerce")`` (values
   that are not numbers become missing and are counted); categorical columns to the ``str`` dtype (missing values
   stay missing; integral floats such as ``2007.0`` become ``"2007"``).
3. ``drop_missing_target``: drop rows whose target is missing (always).
4. ``drop_duplicates``: drop rows repeating an earlier row (if ``cleaning.drop_duplicates``).
5. ``missing_<policy>``: per column, ``drop_row``, ``mean``, ``median``, ``mode``, ``constant`` or ``keep``.
6. ``outliers_<policy>``: numeric columns only, ``clip_iqr`` or ``drop_iqr`` with ``[Q1 - k*IQR, Q3 + k*IQR]``.

The snapshot is streamed, never held whole (:mod:`kiln.tasks.features.cleaning_passes`): one pass over its row
groups coerces, counts and hashes rows for duplicate detection; each fill statistic and IQR bound is computed on
the one column it needs; a last pass writes the kept rows. The result equals that of cleaning the whole frame.

Fill statistics (mean, median, mode) and IQR bounds are computed on the whole cleaned dataset, before the
train/test split. The leakage this allows is negligible for imputation and outlier bounds; the statistics that
matter (feature scaling) are fitted by ``build_features`` on the train split only.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from kiln.tasks.features.batches import BATCH_ROWS, empty_frame, file_dtypes
from kiln.tasks.features.cleaning_rules import (
    LOUD_SHARE,
    CleanError,
    ColumnCoercion,
    Rules,
    resolve_policies,
)
from kiln.tasks.features.column_types import infer_column_types
from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.spec import CleaningSpec, ColumnType, PipelineSpec, TaskType
from kiln.tasks.storage.artifacts import write_json

__all__ = ["LOUD_SHARE", "CleanConfig", "CleanError", "CleanResult", "clean", "resolve_policies", "run_clean"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CleanConfig:
    """Settings of the ``clean`` step."""

    target: str
    """The target column; rows where it is missing are dropped."""
    task: TaskType
    """``classification`` or ``regression`` (a regression target must be numeric)."""
    columns: dict[str, ColumnType]
    """Declared column types (spec field ``columns``); others are inferred."""
    cleaning: CleaningSpec
    """Duplicate handling and the per-column missing-value and outlier policies."""

    min_rows: int = 1
    """``expectations.min_rows``: the fewest rows that cleaning may leave."""

    @classmethod
    def from_spec(cls, spec: PipelineSpec) -> CleanConfig:
        """The config a pipeline spec implies."""
        return cls(target=spec.target, task=spec.task, columns=dict(spec.columns), cleaning=spec.cleaning,
                   min_rows=spec.expectations.min_rows)


@dataclass(frozen=True)
class CleanResult:
    """What ``clean`` wrote."""

    rows_in: int
    rows_out: int
    dropped: int
    missing_target: int
    """Rows dropped because their target was missing (part of ``dropped``)."""
    column_types: dict[str, str]
    """Kept columns (target included) to ``numeric`` or ``categorical``, in column order."""
    report_file: str
    """Path of ``clean_report.json``."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the step's XCom value)."""
        return asdict(self)


def run_clean(config: CleanConfig, snapshot_dir: Path, out_dir: Path, *, batch_rows: int = BATCH_ROWS
              ) -> CleanResult:
    """Clean ``snapshot_dir/snapshot.parquet``; write ``clean.parquet`` and ``clean_report.json`` into ``out_dir``.

    The snapshot is read in record batches of ``batch_rows`` (see :mod:`kiln.tasks.features.cleaning_passes` for
    what is held in memory); the result does not depend on ``batch_rows``.

    Args:
        config: the step's settings.
        snapshot_dir: the published output of ``ingest``.
        out_dir: an empty folder that the caller publishes once this returns; nothing is written on failure.
        batch_rows: rows per record batch.

    Returns:
        Row counts and the kept columns' types.

    Raises:
        SchemaError: the target or a declared column is not in the data.
        CleanError: a policy names a missing or ignored column, does not fit the column's type, lacks its
            ``fill_value``; a regression target holds no numbers; or a rule removed the last rows.
        FileNotFoundError: the snapshot is missing.
    """
    import pyarrow.parquet as pq

    from kiln.tasks.features.cleaning_passes import (
        Edits,
        SnapshotPasses,
        apply_missing,
        apply_outliers,
        first_occurrences,
    )

    snapshot = Path(snapshot_dir) / keys.SNAPSHOT_FILE
    if not snapshot.is_file():
        raise FileNotFoundError(f"no snapshot at {snapshot}; run ingest first and pass its output folder")
    pf = pq.ParquetFile(snapshot)
    rows_in = pf.metadata.num_rows
    if rows_in == 0:
        raise CleanError(f"snapshot {snapshot} has no rows; fix the source or the ingest sample_fraction")
    dtypes = file_dtypes(pf)
    types = infer_column_types(empty_frame(pf), config.columns, config.target, config.task)
    policies = resolve_policies(config.cleaning, config.target, config.task, types, list(dtypes))
    rules = Rules()
    for column in [c for c, t in types.items() if t == "ignore"]:
        rules.record("drop_ignored", column, rows_in, rows_in, always=True)
    kept: dict[str, str] = {c: t for c, t in types.items() if t != "ignore"}
    passes = SnapshotPasses(pf, dtypes, {c: ColumnCoercion(c, t, dtypes[c], regression_target=(
        c == config.target and config.task == "regression")) for c, t in kept.items()}, batch_rows)

    keep, hashes = passes.scan(config.target, config.cleaning.drop_duplicates)
    for coercion in passes.coercions.values():
        coercion.finish(rules, rows_in)
    missing_target = rows_in - int(keep.sum())
    rules.record("drop_missing_target", config.target, rows_in, int(keep.sum()), always=True)
    if hashes is not None:
        n, keep = int(keep.sum()), first_occurrences(hashes, keep)
        del hashes
        rules.record("drop_duplicates", None, n, int(keep.sum()), always=True)
    edits = Edits()
    for column, policy in policies.items():
        apply_missing(passes, keep, column, kept[column], policy, rules, edits)
    for column, policy in policies.items():
        if policy.outliers != "none":
            apply_outliers(passes, keep, column, policy, rules, edits)

    rows_out = int(keep.sum())
    _check_kept(config, rules, rows_in, rows_out)
    out_dir = Path(out_dir)
    passes.write(out_dir / keys.CLEAN_FILE, keep, edits)
    report_file = write_json(out_dir / keys.CLEAN_REPORT_FILE, {
        "rows_in": rows_in, "rows_out": rows_out, "missing_target": missing_target, "rules": rules.records,
        "column_types": kept,
        "target": config.target, "task": config.task})
    log.info("clean: rows in %d out %d dropped %d; %d columns kept; wrote %s", rows_in, rows_out, rows_in - rows_out,
             len(kept), out_dir / keys.CLEAN_FILE)
    return CleanResult(rows_in=rows_in, rows_out=rows_out, dropped=rows_in - rows_out, missing_target=missing_target,
                       column_types=kept, report_file=str(report_file))


def _check_kept(config: CleanConfig, rules: Rules, rows_in: int, rows_out: int) -> None:
    """Stop when cleaning left too little to train on: fewer than ``min_rows``, or more than
    ``cleaning.max_dropped_share`` of the snapshot dropped. The message names each rule that dropped rows.

    Raises:
        CleanError: too few rows are left.
    """
    limit, dropped = config.cleaning.max_dropped_share, rows_in - rows_out
    if rows_out >= config.min_rows and dropped <= limit * rows_in:
        return
    by_rule = "; ".join(f"{r['rule']}{' on ' + r['column'] if r['column'] else ''} dropped {r['dropped']}"
                        for r in rules.records if r["dropped"])
    why = (f"that is below expectations.min_rows ({config.min_rows})" if rows_out < config.min_rows else
           f"{dropped / rows_in:.1%} dropped is more than cleaning.max_dropped_share ({limit:g})")
    raise CleanError(f"cleaning kept {rows_out} of {rows_in} rows ({by_rule}); {why}. If those rows are real data "
                     "(repeated records are, when they count events), turn that rule off (e.g. "
                     "cleaning.drop_duplicates: false) or change its policy; otherwise fix the source")


def clean(ctx: RunContext) -> CleanResult:
    """Clean the validated snapshot into ``<run>/clean``."""
    config = CleanConfig.from_spec(ctx.spec)
    result = ctx.publish(keys.CLEAN, lambda out: run_clean(config, ctx.input_dir(keys.INGEST), out))
    return replace(result, report_file=str(ctx.input_dir(keys.CLEAN) / keys.CLEAN_REPORT_FILE))


