"""The cleaning policy and its pieces for the ``clean`` step: resolving each column's policy, recording rule
applications, and coercing a column's values, one record batch at a time, exactly as coercing it whole would.

A coercion depends on the whole column in two ways: a float categorical column becomes ``"2007"`` (not
``"2007.0"``) only if every value is integral, and a column parsed from text is ``int64`` only if every batch
parsed as integers. :class:`ColumnCoercion` observes every batch first (``observe``), then coerces any batch
the same way (``apply``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kiln.tasks.errors import DataError
from kiln.tasks.features.column_types import missing_column_message
from kiln.tasks.spec import CleaningSpec, ColumnCleaning, ColumnType, TaskType

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


@dataclass
class Rules:
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


def resolve_policies(cleaning: CleaningSpec, target: str, task: TaskType,
                     types: dict[str, ColumnType], columns: list[str]
                     ) -> dict[str, ColumnCleaning]:
    """The effective policy of every kept non-target column (and of the target, if it has outlier rules).

    A column's entry under ``cleaning.columns`` overrides the fields it sets; the rest come from
    ``default_numeric`` or ``default_categorical``.

    Raises:
        CleanError: listing every policy that names an absent or ignored column, does not fit the column's
            type, or lacks the ``fill_value`` that ``missing: constant`` needs.
    """
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
        elif column == target and override.missing not in (None, "drop_row"):
            problems.append(f"{where}: the target's missing rows are always dropped; remove 'missing: "
                            f"{override.missing}'")
        else:
            problems += _policy_problems(_merge(override, _default(cleaning, types[column])), types[column], where)
    if task == "regression" and types.get(target) != "numeric":
        problems.append(f"columns.{target}: a regression target must be numeric, but it is declared "
                        f"'{types.get(target)}'; declare it numeric or set task: classification")
    if problems:
        raise CleanError("invalid cleaning policy:\n" + "\n".join(f"  - {p}" for p in problems))
    policies = {}
    for column, ctype in types.items():
        if ctype == "ignore" or (column == target and column not in cleaning.columns):
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
        elif ctype == "numeric" and as_number(policy.fill_value) is None:
            problems.append(f"{where}: fill_value {policy.fill_value!r} is not a number, but the column is numeric")
    if ctype == "categorical" and policy.outliers != "none":
        problems.append(f"{where}: outliers '{policy.outliers}' applies to numeric columns only; use 'none'")
    return problems


def as_number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def as_label(value: Any) -> str:
    """A categorical fill value as a string (a YAML ``1`` arrives as ``1.0`` and becomes ``"1"``)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)




@dataclass
class ColumnCoercion:
    """Coerces one kept column to numbers or strings, batch by batch, as coercing the whole column would.

    Call :meth:`observe` on every batch of the column, then :meth:`finish` once, then :meth:`apply` on any batch.
    """

    column: str
    ctype: str
    source_dtype: Any
    regression_target: bool = False
    lost: int = 0
    examples: list[str] = field(default_factory=list)
    has_values: bool = False
    has_numbers: bool = False
    integral: bool = True
    not_missing: int = 0
    parsed_dtypes: set[Any] = field(default_factory=set)
    out_dtype: Any = None

    @property
    def _kind(self) -> str:
        """``as_is``, ``to_float`` (bools, nullable numbers), ``parse`` (text to numbers), ``as_is_text``,
        ``float_label`` or ``to_text``."""
        import pandas as pd

        dtype = self.source_dtype
        if self.ctype == "numeric":
            if pd.api.types.is_bool_dtype(dtype) or (pd.api.types.is_numeric_dtype(dtype)
                                                     and isinstance(dtype, pd.api.extensions.ExtensionDtype)):
                return "to_float"  # plain numpy floats: nullable Int64 cannot take a fractional fill value
            return "as_is" if pd.api.types.is_numeric_dtype(dtype) else "parse"
        if pd.api.types.is_string_dtype(dtype) and not pd.api.types.is_object_dtype(dtype):
            return "as_is_text"
        return "float_label" if pd.api.types.is_float_dtype(dtype) else "to_text"

    def observe(self, s: pd.Series) -> pd.Series:
        """Take one batch's statistics; return values to hash for duplicate detection (equal iff the coerced
        values are equal, whatever the other batches hold)."""
        import pandas as pd

        kind = self._kind
        if kind == "parse":
            out = pd.to_numeric(s, errors="coerce")
            lost = s.notna() & out.isna()
            self.lost += int(lost.sum())
            for value in s[lost].astype(str):
                if len(self.examples) >= 5:
                    break
                if value not in self.examples:
                    self.examples.append(value)
            self.has_values |= bool(s.notna().any())
            self.has_numbers |= bool(out.notna().any())
            self.parsed_dtypes.add(out.dtype)
            return out.astype("float64")
        if kind in ("float_label", "to_text"):
            self.not_missing += int(s.notna().sum())
        if kind == "float_label":
            self.integral &= bool((s.dropna() % 1 == 0).all())
            return s
        if kind == "to_text":
            return s.astype("str")
        return s.astype("float64") if kind == "to_float" else s

    def finish(self, rules: Rules, rows: int) -> None:
        """Record the coercion over all ``rows`` (as one rule line).

        Raises:
            CleanError: the column is the regression target and holds no numbers.
        """
        import numpy as np

        kind = self._kind
        if kind == "parse":
            self.out_dtype = np.result_type(*self.parsed_dtypes) if self.parsed_dtypes else np.dtype("float64")
            if self.regression_target and self.has_values and not self.has_numbers:
                raise CleanError(f"the regression target '{self.column}' holds no numbers (e.g. {self.examples}); "
                                 "a regression target must be numeric: fix the data or set task: classification")
            rules.record("coerce_numeric", self.column, rows, rows, self.lost,
                         f"not numbers, now missing: e.g. {self.examples}" if self.examples else "")
        elif kind in ("float_label", "to_text"):
            dtype = "Int64" if kind == "float_label" and self.integral else self.source_dtype
            rules.record("coerce_categorical", self.column, rows, rows, self.not_missing, f"{dtype} -> str")

    def apply(self, s: pd.Series) -> pd.Series:
        """One batch of the column, coerced (after :meth:`finish`)."""
        import pandas as pd

        kind = self._kind
        if kind == "parse":
            return pd.to_numeric(s, errors="coerce").astype(self.out_dtype)
        if kind == "to_float":
            return s.astype("float64")
        if kind == "float_label":
            return (s.astype("Int64") if self.integral else s).astype("str")
        return s.astype("str") if kind == "to_text" else s
