"""The record validation of a scored partition, column at a time: each row the model server would refuse is set
aside with the field and the reason, and the others are made ready for the feature transform.

The rules are the model server's (:class:`kiln.tasks.features.records.RecordTransform` and
:func:`kiln.tasks.serving.inputs.check_in_range`), applied to Arrow columns with numpy instead of to JSON values
one at a time, so that a partition of a million rows is checked in well under a second:

* numeric input: a number or null (null and NaN are imputed as in training); text is parsed as a number (a value
  that is not one is rejected); an infinite value, or one whose scaled value does not fit a float32, is rejected;
* categorical input: text, a number, a boolean or null; a number is looked up in the vocabulary as the server
  looks it up (``2007`` also as ``"2007.0"`` and ``2007.0`` also as ``"2007"``); an infinite number is rejected;
* the id column (``scoring.id_column``): a row without an id is rejected.

The column types themselves were checked for the whole input before (:func:`kiln.tasks.scoring.inputs.
check_schema`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from kiln.tasks.serving.inputs import FLOAT32_MAX

if TYPE_CHECKING:
    from kiln.tasks.features.transform import CategoricalColumn, FeatureTransform, NumericColumn

#: The id column of an input whose spec names none: each row's ordinal in the input (0-based).
ORDINAL = "row"
_SHOWN_CHARS = 40


@dataclass(frozen=True)
class CheckedRows:
    """A partition's rows, split into the accepted ones and the rejects."""

    frame: pd.DataFrame
    """The accepted rows' model inputs (numeric columns as float64, NaN for missing; categorical ones as the
    input's column, numbers as the text the vocabulary holds), in partition order."""
    ids: pa.Array
    """The accepted rows' ids."""
    rejects: pa.Table
    """One row per rejected row: its id, ``field`` (the column) and ``reason``."""


class _Problems:
    """The first problem of each row: a row keeps the first reason found for it."""

    def __init__(self, n: int):
        self.bad = np.zeros(n, dtype=bool)
        self.field = np.empty(n, dtype=object)
        self.reason = np.empty(n, dtype=object)

    def add(self, mask: np.ndarray, field: str, reasons: Callable[[np.ndarray], list[str]]) -> None:
        new = np.flatnonzero(mask & ~self.bad)
        if new.size:
            self.field[new] = field
            self.reason[new] = reasons(new)
            self.bad[new] = True


def check_rows(table: pa.Table, transform: FeatureTransform, id_column: str | None, first_row: int) -> CheckedRows:
    """Split ``table`` (a partition's columns) into rows the model takes and rejects with their reasons.

    Args:
        table: the model's input columns (and ``id_column``).
        transform: the bundle's fitted feature transform.
        id_column: the id column, or None to name rows by their ordinal (``first_row`` is the first one's).
        first_row: the ordinal of the table's first row in the whole input.
    """
    n = table.num_rows
    problems = _Problems(n)
    if id_column is not None:
        ids = table[id_column].combine_chunks()
        problems.add(ids.is_null().to_numpy(zero_copy_only=False), id_column,
                     lambda rows: ["the row has no id (scoring.id_column is null)"] * len(rows))
        id_name = id_column
    else:
        ids, id_name = pa.array(np.arange(first_row, first_row + n, dtype=np.int64)), ORDINAL
    numbers = {column.name: _numbers(table[column.name], column, problems) for column in transform.numeric}
    categories = {c.name: _categories(table[c.name], c, problems) for c in transform.categorical}
    rejected = np.flatnonzero(problems.bad)
    good = pa.array(~problems.bad) if rejected.size else None
    # Text stays in Arrow (the frame's columns wrap it, the transform looks it up there): a partition's strings
    # are never turned into Python objects.
    frame = pd.DataFrame({**{name: values if good is None else values[~problems.bad]
                             for name, values in numbers.items()},
                          **{name: (values if good is None else values.filter(good)).to_pandas()
                             for name, values in categories.items()}})
    rejects = pa.table({id_name: ids.take(pa.array(rejected, pa.int64())),
                        "field": pa.array(problems.field[rejected].tolist(), pa.string()),
                        "reason": pa.array(problems.reason[rejected].tolist(), pa.string())})
    return CheckedRows(frame=frame, ids=ids if good is None else ids.filter(good), rejects=rejects)


def _numbers(column: pa.ChunkedArray, spec: NumericColumn, problems: _Problems) -> np.ndarray:
    """A numeric input as float64 (NaN: missing); unparseable, infinite and out-of-range values are rejected."""
    raw: pd.Series | None = None
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or \
            pa.types.is_dictionary(column.type):
        raw = column.to_pandas()
        values = pd.to_numeric(raw, errors="coerce").to_numpy(np.float64, na_value=np.nan)
        unparsed = np.isnan(values) & raw.notna().to_numpy()
        problems.add(unparsed, spec.name, lambda rows: [f"expected a number or null, found {_show(raw.iat[i])}"
                                                        for i in rows])
    else:
        values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
    infinite = np.isinf(values)
    problems.add(infinite, spec.name, lambda rows: [f"expected a finite number or null, found {_show(values[i])}"
                                                    for i in rows])
    with np.errstate(invalid="ignore", over="ignore"):
        beyond = np.abs((values - spec.center) / spec.scale) > FLOAT32_MAX
    if beyond.any():
        bound = FLOAT32_MAX * float(spec.scale)
        low, high = float(spec.center) - bound, float(spec.center) + bound
        problems.add(beyond & ~infinite, spec.name, lambda rows: [
            f"{_show(values[i])} is beyond what the model can take: {spec.name} must lie between {low:.4g} and "
            f"{high:.4g} (its scaled value must fit a float32)" for i in rows])
    return values


def _categories(column: pa.ChunkedArray, spec: CategoricalColumn, problems: _Problems) -> pa.ChunkedArray:
    """A categorical input as it is (text, booleans), or numbers as the text the vocabulary holds (null:
    missing)."""
    kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)):
        return column
    values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
    infinite = np.isinf(values)
    problems.add(infinite, spec.name, lambda rows: [
        f"expected a finite number, a string or null, found {_show(values[i])}" for i in rows])
    # Each distinct number is looked up once (a column of years holds a handful), then spread to its rows.
    distinct, where = np.unique(values, return_inverse=True)
    out = _served_forms(distinct, pa.types.is_integer(kind), spec.vocabulary)[where.reshape(-1)]
    out[~np.isfinite(values)] = None
    return pa.chunked_array([pa.array(out, pa.string())])


def _served_forms(numbers: np.ndarray, integers: bool, vocabulary: tuple[str, ...]) -> np.ndarray:
    """The text the model server looks each of ``numbers`` up as: its own form (an int as ``"2007"``, a float as
    ``"2007.0"``), or the other form of an integral number where only that one is in ``vocabulary``."""
    known = set(vocabulary)
    out = np.empty(len(numbers), dtype=object)
    for i, number in enumerate(numbers.tolist()):
        if not math.isfinite(number):
            continue
        whole = str(int(number)) if number.is_integer() else None
        own = whole if integers and whole is not None else str(number)
        other = (whole + ".0" if integers else whole) if whole is not None else own
        out[i] = other if own not in known and other in known else own
    return out


def _show(value: Any) -> str:
    """A short, JSON-flavoured form of a value for a reason."""
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    text = repr(value.item() if isinstance(value, np.generic) else value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS - 4] + "...'"
