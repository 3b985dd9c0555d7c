"""Raw JSON records to the model's float32 matrix: the serving-side twin of :meth:`FeatureTransform.transform`.

A model server receives rows as parsed JSON (lists of dicts of ``str``, ``int``, ``float``, ``bool`` and ``None``)
and must turn them into exactly the matrix training would have produced, a few microseconds per record. Building a
pandas DataFrame per request costs far more than that, so :class:`RecordTransform` works on plain Python values
and numpy, with the same float64 arithmetic as the training path. It also checks every record and reports every
problem at once (:class:`RecordError`), so a client can fix a request in one round trip.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from kiln.tasks.features.transform import FeatureTransform

#: Most problems listed in one :class:`RecordError`; a request with more gets a last entry saying so.
MAX_ERRORS = 20

_NUMERIC_TYPES = frozenset({int, float, type(None)})
_SHOWN_CHARS = 40


class RecordError(ValueError):
    """Request records that cannot be transformed; ``errors`` holds one entry per problem.

    Each entry is ``{"field": "records[3].bill_length_mm", "message": "expected a number or null, found 'abc'"}``;
    ``field`` is ``records`` for the list itself and ``records[i]`` for a whole record.
    """

    def __init__(self, errors: list[dict[str, str]]):
        self.errors = errors
        listed = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
        super().__init__(f"{len(errors)} problem(s) in the request records: {listed}{more}")


class RecordTransform:
    """The fast, exact record path of one fitted :class:`FeatureTransform`.

    ``RecordTransform(t)(records)`` equals ``t.transform(pd.DataFrame(records))`` bit for bit (``np.array_equal``)
    for valid records, with one deliberate difference in how numbers meet a categorical vocabulary (below).

    Accepted values, per input column:

    * numeric: ``int`` or ``float`` (not ``bool``), or ``None`` (missing: imputed with the train mean, as in
      training). NaN and infinities are errors: JSON has no such numbers, so a client that sends them has a bug.
    * categorical: ``str``, ``int``, ``float``, ``bool`` or ``None`` (null: the unknown slot). Training compared
      ``series.astype("string")`` with the vocabulary, so a string is looked up as it is and ``True``/``False``
      as ``"True"``/``"False"``. A number is looked up as Python's ``str`` of it (``"2007"`` for an int,
      ``"2007.0"`` for a float, pandas' own forms); an integral number that misses is then tried in the other
      form (``2007`` also as ``"2007.0"``, ``2007.0`` also as ``"2007"``). The vocabulary holds whichever form
      the training column's dtype produced (an int column gives ``"2007"``, a float column with nulls
      ``"2007.0"``), and a JSON client cannot know which, nor keep it: JSON writers drop or add ``.0`` freely.
      A pandas DataFrame would stringify a number according to its whole column (one null turns an int column
      into floats), so this per-value rule is where the record path differs from ``transform(DataFrame)``: on
      purpose, it gives each record the slot training gave the same value. Non-finite floats are errors.

    Keys outside the input columns are ignored (clients often send the target or ids). Records must be ``dict``
    objects holding every input column.
    """

    def __init__(self, transform: FeatureTransform):
        self.transform = transform
        self._numeric = [c.name for c in transform.numeric]
        # Column vectors: the numeric block is computed as [columns, records] and transposed into place.
        self._means = np.array([[c.mean] for c in transform.numeric], dtype=np.float64).reshape(-1, 1)
        self._centers = np.array([[c.center] for c in transform.numeric], dtype=np.float64).reshape(-1, 1)
        self._scales = np.array([[c.scale] for c in transform.numeric], dtype=np.float64).reshape(-1, 1)
        self._categorical: list[tuple[str, dict[str, int], int]] = []
        offsets = []
        offset = len(self._numeric)
        for c in transform.categorical:
            self._categorical.append((c.name, {value: i for i, value in enumerate(c.vocabulary)},
                                      len(c.vocabulary)))
            offsets.append(offset)
            offset += len(c.vocabulary) + 1
        self._offsets = np.array(offsets, dtype=np.int64).reshape(-1, 1)
        self._width = transform.input_dim
        self._columns = [(name, _numeric_problem) for name in self._numeric] + \
            [(c.name, _categorical_problem) for c in transform.categorical]

    def __call__(self, records: Any) -> np.ndarray:
        """Validate ``records`` and transform them to a ``[len(records), input_dim]`` float32 matrix.

        Args:
            records: the request's ``records`` value: a non-empty list of JSON objects (``dict``).

        Returns:
            The feature matrix, identical to what training's transform gives for the same values.

        Raises:
            RecordError: ``records`` is not a non-empty list, a record is not an object, lacks an input column or
                holds a value of the wrong type or a non-finite number; lists every problem (up to
                :data:`MAX_ERRORS`).
        """
        if not isinstance(records, list) or not records:
            found = "an empty list" if isinstance(records, list) else _show(records)
            raise RecordError([{"field": "records",
                                "message": f"expected a non-empty list of records (JSON objects), found {found}"}])
        out = self._encode(records)
        if out is None:
            errors = self.problems(records)
            if not errors:  # the fast path and the checks disagree: a bug here, not a bad request
                raise RuntimeError("records were rejected but no problem was found; please report this")
            raise RecordError(errors)
        return out

    def problems(self, records: list[Any]) -> list[dict[str, str]]:
        """Every problem of ``records`` (a list), up to :data:`MAX_ERRORS`, as ``{"field", "message"}`` entries."""
        errors: list[dict[str, str]] = []
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                errors.append({"field": f"records[{i}]", "message": f"expected a JSON object, found "
                                                                   f"{_show(record)}"})
            else:
                for name, check in self._columns:
                    if name not in record:
                        message: str | None = "missing; every record needs all input columns of the model"
                    else:
                        message = check(record[name])
                    if message is not None:
                        errors.append({"field": f"records[{i}].{name}", "message": message})
            if len(errors) > MAX_ERRORS:  # one more than listed: there are more, and they are not worth scanning
                errors = errors[:MAX_ERRORS]
                errors.append({"field": "records", "message": f"more problems not listed (stopped after "
                                                              f"{MAX_ERRORS})"})
                break
        return errors

    def _encode(self, records: list[Any]) -> np.ndarray | None:
        """The matrix, or ``None`` at the first sign of a bad record (then :meth:`problems` says what).

        A fixed number of numpy operations per request, whatever the number of columns, so that one record
        costs a few microseconds.
        """
        n = len(records)
        if not all(isinstance(r, dict) for r in records):
            return None
        out = np.zeros((n, self._width), dtype=np.float32)
        try:
            if self._numeric:
                values = self._numeric_values(records)
                if values is None:
                    return None
                # The float64 expression of FeatureTransform.transform, so the results are bit-identical.
                out[:, :len(self._numeric)] = ((values - self._centers) / self._scales).T
            if self._categorical:
                codes = [lookup.get(v, unknown) if type(v) is str else _code(v, lookup, unknown)
                         for name, lookup, unknown in self._categorical for v in [r[name] for r in records]]
                if -1 in codes:
                    return None
                # Flat positions in ``out``: row * width + the column's block offset + the value's slot.
                index = np.array(codes, dtype=np.int64).reshape(len(self._categorical), n) + self._offsets
                index += np.arange(0, n * self._width, self._width, dtype=np.int64)
                out.reshape(-1)[index.ravel()] = 1.0
        except KeyError:
            return None
        return out

    def _numeric_values(self, records: list[dict[str, Any]]) -> np.ndarray | None:
        """``[numeric columns, n]`` float64, nulls imputed; ``None`` if a value is not a finite number or null."""
        columns = [[r[name] for r in records] for name in self._numeric]
        if not all(_NUMERIC_TYPES.issuperset(map(type, col)) for col in columns):
            return None
        try:
            values = np.array(columns, dtype=np.float64)  # None becomes NaN
        except OverflowError:  # an int beyond the float range
            return None
        finite = np.isfinite(values)
        if finite.all():
            return values
        if np.count_nonzero(~finite) != sum(col.count(None) for col in columns):
            return None  # NaN or infinity sent as a number
        return np.where(finite, values, self._means)


def _code(value: Any, lookup: dict[str, int], unknown: int) -> int:
    """Vocabulary index of a non-string categorical value; ``unknown`` if unseen or null, -1 if invalid."""
    if value is None:
        return unknown
    kind = type(value)
    if kind is bool:
        return lookup.get(str(value), unknown)
    if kind is int:
        index = lookup.get(str(value))
        if index is None:
            try:
                as_float = float(value)
            except OverflowError:
                return unknown
            if as_float == value:
                index = lookup.get(str(as_float))
        return unknown if index is None else index
    if kind is float:
        if not math.isfinite(value):
            return -1
        index = lookup.get(str(value))
        if index is None and value.is_integer():
            index = lookup.get(str(int(value)))
        return unknown if index is None else index
    return -1


def _numeric_problem(value: Any) -> str | None:
    kind = type(value)
    if value is None:
        return None
    if kind is int:
        try:
            float(value)
        except OverflowError:
            return "number out of range (beyond the float64 range)"
        return None
    if kind is float:
        return None if math.isfinite(value) else f"expected a finite number or null, found {_show(value)}"
    return f"expected a number or null, found {_show(value)}"


def _categorical_problem(value: Any) -> str | None:
    if value is None or type(value) in (str, bool, int):
        return None
    if type(value) is float:
        return None if math.isfinite(value) else f"expected a finite number, a string or null, found {_show(value)}"
    return f"expected a string, number, boolean or null, found {_show(value)}"


def _show(value: Any) -> str:
    """A short, JSON-flavoured description of a value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, int | float):
        text = str(value)
        return text if len(text) <= _SHOWN_CHARS else f"a number of {len(text)} characters"
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS - 4] + "...'"


def records_from_frame(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows of ``df`` as JSON-ready records of plain Python values, missing values as ``None``.

    Unlike ``json.loads(df.to_json(orient="records"))`` (10 significant digits by default), floats keep every bit,
    so the records transform to exactly the matrix ``df`` does; e.g. to replay sample rows against a server.

    Args:
        df: raw rows (numeric, string, boolean columns).

    Returns:
        One dict per row, in column order.
    """
    plain = df.astype(object)
    return plain.where(df.notna(), None).to_dict(orient="records")
