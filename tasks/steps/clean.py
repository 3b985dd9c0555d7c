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

Fill statistics (mean, median, mode) and IQR bounds are computed on the whole cleaned dataset, before the
train/test split. The leakage this allows is negligible for imputation and outlier bounds; the statistics that
matter (feature scaling) are fitted by ``build_features`` on the train split only.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.tasks.errors import DataError
from kiln.tasks.features.column_types import infer_column_types, missing_column_message
from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.spec import CleaningSpec, ColumnCleaning, ColumnType, PipelineSpec, TaskType
from kiln.tasks.storage.artifacts import write_json

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

#: A rule that drops more than this share of the rows it sees is logged as a warning.
LOUD_SHARE = 0.1
_MISSING_ALLOWED: dict[str, tuple[str, ...]] = {
    "numeric": ("drop_row", "mean", "median", "mode", "constant", "keep"),
    "categorical": ("drop_row", "mode", "constant", "keep"),
}


class CleanError(DataError):
    """The cleaning policy does not fit the data, or cleaning left no rows."""


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


@dataclass
class _Rules:
    """Records rule applications; raises as soon as a rule removes the last rows."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def record(self, rule: str, column: str | None, rows_in: int, rows_out: int, changed: int = 0,
               detail: str = "", always: bool = False) -> None:
        dropped = rows_in - rows_out
        line = ("rule %s column %s: rows in %d out %d dropped %d, values changed %d%s", rule, column or "-",
                rows_in, rows_out, dropped, changed, f" ({detail})" if detail else "")
        if not (always or dropped or changed):
            log.debug(*line)
            return
        if rows_in and dropped > LOUD_SHARE * rows_in:
            log.warning(*line)
            log.warning("rule %s dropped %.1f %% of the rows it saw", rule, 100 * dropped / rows_in)
        else:
            log.info(*line)
        self.records.append({"rule": rule, "column": column, "rows_in": rows_in, "rows_out": rows_out,
                             "dropped": dropped, "changed": changed, **({"detail": detail} if detail else {})})
        if rows_out == 0 and rows_in > 0:
            where = f" on column '{column}'" if column else ""
            raise CleanError(f"rule {rule}{where} removed the last {rows_in} rows; nothing is left to train on. "
                             f"Change that rule's cleaning policy or fix the data")


def run_clean(config: CleanConfig, snapshot_dir: Path, out_dir: Path) -> CleanResult:
    """Clean ``snapshot_dir/snapshot.parquet``; write ``clean.parquet`` and ``clean_report.json`` into ``out_dir``.

    Args:
        config: the step's settings.
        snapshot_dir: the published output of ``ingest``.
        out_dir: an empty folder that the caller publishes once this returns; nothing is written on failure.

    Returns:
        Row counts and the kept columns' types.

    Raises:
        SchemaError: the target or a declared column is not in the data.
        CleanError: a policy names a missing or ignored column, does not fit the column's type, lacks its
            ``fill_value``; a regression target holds no numbers; or a rule removed the last rows.
        FileNotFoundError: the snapshot is missing.
    """
    import pandas as pd

    snapshot = Path(snapshot_dir) / keys.SNAPSHOT_FILE
    if not snapshot.is_file():
        raise FileNotFoundError(f"no snapshot at {snapshot}; run ingest first and pass its output folder")
    df = pd.read_parquet(snapshot)
    rows_in = len(df)
    if rows_in == 0:
        raise CleanError(f"snapshot {snapshot} has no rows; fix the source or the ingest sample_fraction")
    types = infer_column_types(df, config.columns, config.target, config.task)
    policies = resolve_policies(config, types, list(df.columns))
    rules = _Rules()

    for column in [c for c, t in types.items() if t == "ignore"]:
        df = df.drop(columns=column)
        rules.record("drop_ignored", column, len(df), len(df), always=True)
    kept: dict[str, str] = {c: t for c, t in types.items() if t != "ignore"}
    for column, ctype in kept.items():
        df[column] = _coerce(df[column], column, ctype, config, rules)

    n = len(df)
    df = df[df[config.target].notna()]
    missing_target = n - len(df)
    rules.record("drop_missing_target", config.target, n, len(df), always=True)
    if config.cleaning.drop_duplicates:
        n = len(df)
        df = df.drop_duplicates()
        rules.record("drop_duplicates", None, n, len(df), always=True)
    for column, policy in policies.items():
        df = _apply_missing(df, column, kept[column], policy, rules)
    for column, policy in policies.items():
        if policy.outliers != "none":
            df = _apply_outliers(df, column, policy, rules)

    _check_kept(config, rules, rows_in, len(df))
    df = df.reset_index(drop=True)
    out_dir = Path(out_dir)
    df.to_parquet(out_dir / keys.CLEAN_FILE, engine="pyarrow", index=False)
    report_file = write_json(out_dir / keys.CLEAN_REPORT_FILE, {
        "rows_in": rows_in, "rows_out": len(df), "missing_target": missing_target, "rules": rules.records,
        "column_types": kept,
        "target": config.target, "task": config.task})
    log.info("clean: rows in %d out %d dropped %d; %d columns kept; wrote %s", rows_in, len(df), rows_in - len(df),
             len(kept), out_dir / keys.CLEAN_FILE)
    return CleanResult(rows_in=rows_in, rows_out=len(df), dropped=rows_in - len(df), missing_target=missing_target,
                       column_types=kept, report_file=str(report_file))


def _check_kept(config: CleanConfig, rules: _Rules, rows_in: int, rows_out: int) -> None:
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


def resolve_policies(config: CleanConfig, types: dict[str, ColumnType], columns: list[str]
                     ) -> dict[str, ColumnCleaning]:
    """The effective policy of every kept non-target column (and of the target, if it has outlier rules).

    A column's entry under ``cleaning.columns`` overrides the fields it sets; the rest come from
    ``default_numeric`` or ``default_categorical``.

    Raises:
        CleanError: listing every policy that names an absent or ignored column, does not fit the column's
            type, or lacks the ``fill_value`` that ``missing: constant`` needs.
    """
    cleaning = config.cleaning
    problems: list[str] = []
    for ctype in ("numeric", "categorical"):
        problems += _policy_problems(getattr(cleaning, f"default_{ctype}"), ctype, f"cleaning.default_{ctype}")
    for column, override in cleaning.columns.items():
        where = f"cleaning.columns.{column}"
        if column not in types:
            problems.append(f"{where}: " + missing_column_message(column, columns, "the column"))
        elif types[column] == "ignore":
            problems.append(f"{where}: column '{column}' has type 'ignore' and is dropped; remove its policy "
                            "or change its type")
        elif column == config.target and override.missing not in (None, "drop_row"):
            problems.append(f"{where}: the target's missing rows are always dropped; remove 'missing: "
                            f"{override.missing}'")
        else:
            problems += _policy_problems(_merge(override, _default(cleaning, types[column])), types[column], where)
    if config.task == "regression" and types.get(config.target) != "numeric":
        problems.append(f"columns.{config.target}: a regression target must be numeric, but it is declared "
                        f"'{types.get(config.target)}'; declare it numeric or set task: classification")
    if problems:
        raise CleanError("invalid cleaning policy:\n" + "\n".join(f"  - {p}" for p in problems))
    policies = {}
    for column, ctype in types.items():
        if ctype == "ignore" or (column == config.target and column not in cleaning.columns):
            continue
        default = _default(cleaning, ctype)
        policies[column] = _merge(cleaning.columns[column], default) if column in cleaning.columns else default
    return policies


def _default(cleaning: CleaningSpec, ctype: str) -> ColumnCleaning:
    return cleaning.default_numeric if ctype == "numeric" else cleaning.default_categorical


def _merge(override: ColumnCleaning, default: ColumnCleaning) -> ColumnCleaning:
    """``default`` with the fields that ``override`` sets explicitly."""
    return default.model_copy(update={k: getattr(override, k) for k in override.model_fields_set})


def _policy_problems(policy: ColumnCleaning, ctype: str, where: str) -> list[str]:
    problems = []
    if policy.missing is not None and policy.missing not in _MISSING_ALLOWED[ctype]:
        problems.append(f"{where}: missing '{policy.missing}' does not apply to a {ctype} column; allowed: "
                        f"{', '.join(_MISSING_ALLOWED[ctype])}")
    if policy.missing == "constant":
        if policy.fill_value is None:
            problems.append(f"{where}: missing 'constant' needs a fill_value")
        elif ctype == "numeric" and _as_number(policy.fill_value) is None:
            problems.append(f"{where}: fill_value {policy.fill_value!r} is not a number, but the column is numeric")
    if ctype == "categorical" and policy.outliers != "none":
        problems.append(f"{where}: outliers '{policy.outliers}' applies to numeric columns only; use 'none'")
    return problems


def _as_number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _coerce(s: pd.Series, column: str, ctype: str, config: CleanConfig, rules: _Rules) -> pd.Series:
    import pandas as pd

    """``s`` as numbers or strings; records the values that did not survive."""
    rows = len(s)
    if ctype == "numeric":
        if pd.api.types.is_bool_dtype(s.dtype) or (pd.api.types.is_numeric_dtype(s.dtype)
                                                   and isinstance(s.dtype, pd.api.extensions.ExtensionDtype)):
            return s.astype("float64")  # plain numpy floats: nullable Int64 cannot take a fractional fill value
        if pd.api.types.is_numeric_dtype(s.dtype):
            return s
        out = pd.to_numeric(s, errors="coerce")
        lost = s.notna() & out.isna()
        examples = list(dict.fromkeys(s[lost].astype(str)))[:5]
        if column == config.target and config.task == "regression" and s.notna().any() and out.isna().all():
            raise CleanError(f"the regression target '{column}' holds no numbers (e.g. {examples}); a regression "
                             "target must be numeric: fix the data or set task: classification")
        rules.record("coerce_numeric", column, rows, rows, int(lost.sum()),
                     f"not numbers, now missing: e.g. {examples}" if examples else "")
        return out
    if pd.api.types.is_string_dtype(s.dtype) and not pd.api.types.is_object_dtype(s.dtype):
        return s
    if pd.api.types.is_float_dtype(s.dtype) and (s.dropna() % 1 == 0).all():
        s = s.astype("Int64")  # 2007.0 -> "2007", as it would read without missing values
    out = s.astype("str")
    rules.record("coerce_categorical", column, rows, rows, int(s.notna().sum()), f"{s.dtype} -> str")
    return out


def _apply_missing(df: pd.DataFrame, column: str, ctype: str, policy: ColumnCleaning, rules: _Rules
                   ) -> pd.DataFrame:
    """Apply ``policy.missing`` to one column."""
    missing = df[column].isna()
    n_missing, rows = int(missing.sum()), len(df)
    how = policy.missing or "keep"
    if how == "keep" or n_missing == 0:
        rules.record(f"missing_{how}", column, rows, rows)
        return df
    if how == "drop_row":
        df = df[~missing]
        rules.record("missing_drop_row", column, rows, len(df))
        return df
    s = df[column]
    if how == "constant":
        value: Any = _as_number(policy.fill_value) if ctype == "numeric" else _as_label(policy.fill_value)
    elif n_missing == rows:
        raise CleanError(f"column '{column}' is entirely missing, so its {how} cannot be computed; use "
                         "missing: constant, drop the column (type: ignore) or fix the data")
    elif how == "mean":
        value = float(s.mean())
    elif how == "median":
        value = float(s.median())
    else:
        value = s.mode(dropna=True).iloc[0]  # the smallest of the most frequent values: deterministic
        value = value.item() if hasattr(value, "item") else value
    df = df.assign(**{column: s.fillna(value)})
    rules.record(f"missing_{how}", column, rows, rows, n_missing, f"filled with {value!r}")
    return df


def _as_label(value: Any) -> str:
    """A categorical fill value as a string (a YAML ``1`` arrives as ``1.0`` and becomes ``"1"``)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _apply_outliers(df: pd.DataFrame, column: str, policy: ColumnCleaning, rules: _Rules) -> pd.DataFrame:
    """Clip or drop values outside ``[Q1 - k*IQR, Q3 + k*IQR]`` (missing values are left alone)."""
    s, rows = df[column], len(df)
    if s.notna().sum() == 0:
        rules.record(f"outliers_{policy.outliers}", column, rows, rows)
        return df
    q1, q3 = (float(q) for q in s.quantile([0.25, 0.75]))
    k = policy.iqr_factor
    low, high = q1 - k * (q3 - q1), q3 + k * (q3 - q1)
    outside = (s < low) | (s > high)
    detail = f"bounds [{low:.6g}, {high:.6g}]"
    if policy.outliers == "clip_iqr":
        df = df.assign(**{column: s.clip(lower=low, upper=high)})
        rules.record("outliers_clip_iqr", column, rows, rows, int(outside.sum()), detail)
        return df
    df = df[~outside]
    rules.record("outliers_drop_iqr", column, rows, len(df), 0, detail)
    return df
