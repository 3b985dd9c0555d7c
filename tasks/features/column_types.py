"""Column types of a dataset: what the spec declares, completed by inference from the data.

Every data step (``validate``, ``clean``, ``build_features``) needs to know which columns are numbers, which are
categories and which to drop. The spec may declare some; the rest follow from the pandas dtypes.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from kiln.tasks.errors import DataError
from kiln.tasks.spec import ColumnType, TaskType

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


class SchemaError(DataError):
    """A column named by the spec (declared type or target) is not in the data."""


def missing_column_message(column: str, available: Iterable[str], role: str) -> str:
    """A message for a column that is not in the data: names it, suggests the closest match, lists the rest.

    Args:
        column: the column that was looked for.
        available: the columns the data has.
        role: what named the column, e.g. ``"the target"`` or ``"a declared column (spec field 'columns')"``.
    """
    names = [str(c) for c in available]
    close = difflib.get_close_matches(column, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return (f"{role} '{column}' is not in the data.{hint} Available columns: {', '.join(names) or '(none)'}. "
            "Fix the column name in the spec.")


def dtype_column_type(series: pd.Series) -> ColumnType:
    """``"numeric"`` for numeric dtypes (booleans excluded), ``"categorical"`` for everything else."""
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    if is_bool_dtype(series.dtype):
        return "categorical"
    return "numeric" if is_numeric_dtype(series.dtype) else "categorical"


def infer_column_types(df: pd.DataFrame, declared: dict[str, ColumnType], target: str, task: TaskType, *,
                       strict: bool = True) -> dict[str, ColumnType]:
    """The type of every column of ``df``, in column order.

    Declared types win. Otherwise the target is ``"categorical"`` for classification and ``"numeric"`` for
    regression, and other columns follow their dtype (see :func:`dtype_column_type`). Columns declared
    ``"ignore"`` stay in the result: each step drops them itself.

    Args:
        df: the data.
        declared: column types from the spec (``columns``).
        target: the target column.
        task: ``"classification"`` or ``"regression"``.
        strict: with ``False``, declared columns and a target that are absent are skipped instead of raising
            (``validate`` reports them as failed expectations).

    Returns:
        A mapping of every column of ``df`` to its type.

    Raises:
        SchemaError: (strict only) the target or a declared column is not in the data.
    """
    present = set(df.columns)
    if strict:
        if target not in present:
            raise SchemaError(missing_column_message(target, df.columns, "the target column (spec field 'target')"))
        for column in declared:
            if column not in present:
                raise SchemaError(missing_column_message(column, df.columns,
                                                         "the declared column (spec field 'columns')"))
    types: dict[str, ColumnType] = {}
    for column in df.columns:
        if column in declared:
            types[column] = declared[column]
        elif column == target:
            types[column] = "categorical" if task == "classification" else "numeric"
        else:
            types[column] = dtype_column_type(df[column])
    log.debug("column types: %s", types)
    return types
