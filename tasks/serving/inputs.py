"""A predict request's body to records, and the feature matrix's range check: every refusal names the field.

The body is parsed with orjson. JSON has no NaN or infinities, and orjson refuses them (and numbers beyond the
float64 range) as invalid JSON; a client that sends them has a bug worth naming precisely, so such a body is parsed
once more, leniently, and the record transform then names the field that holds the value.

A finite number can still be beyond what the model takes: the features are float32, and ``1e308`` (or ``1e40``
once scaled) overflows to infinity there, which the network turns into NaN. :func:`check_in_range` finds such
values in the matrix and names the record and column, with the range that column accepts.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson

from kiln.tasks.bundle.load import Bundle, RecordError
from kiln.tasks.features.records import MAX_ERRORS

#: Largest finite float32: a feature beyond it in magnitude becomes infinite.
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Tokens of non-finite numbers that a lenient parse reads (Python's ``json`` module reads them; orjson does not).
_NON_FINITE_TOKENS = (b"NaN", b"Infinity")


class RequestError(ValueError):
    """A predict body refused before any model saw it: ``status`` (413 or 422) and ``detail`` (the response's)."""

    def __init__(self, status: int, detail: Any):
        self.status = status
        self.detail = detail
        super().__init__(str(detail))


def _invalid(field: str, message: str) -> RequestError:
    return RequestError(422, [{"field": field, "message": message}])


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "infinity" in exc.msg or any(token in body for token in _NON_FINITE_TOKENS):
            try:
                # Lenient only for what orjson refuses: the transform names the field of the non-finite value.
                return json.loads(body)
            except ValueError:
                pass
        raise _invalid("body", f"is not valid JSON: {exc}") from exc


def parse_records(body: bytes, max_batch: int) -> list[Any]:
    """The records of a predict body.

    Raises:
        RequestError: 422 naming ``body``, ``records`` or ``records[i]``; 413 for more than ``max_batch`` records.
    """
    payload = _loads(body)
    if not isinstance(payload, dict):
        raise _invalid("body", 'must be a JSON object {"records": [{...}, ...]}, found ' f"{type(payload).__name__}")
    if "records" not in payload:
        raise _invalid("records", "is required: a list of record objects")
    records = payload["records"]
    if not isinstance(records, list):
        raise _invalid("records", f"must be a list of objects, found {type(records).__name__}")
    if not records:
        raise _invalid("records", "must hold at least one record")
    if len(records) > max_batch:
        raise RequestError(413, f"a request may hold at most {max_batch} records, found {len(records)}; split it")
    errors = [{"field": f"records[{i}]", "message": f"must be an object (column name to value), found "
                                                    f"{type(r).__name__}"}
              for i, r in enumerate(records) if not isinstance(r, dict)]
    if errors:
        raise RequestError(422, errors[:MAX_ERRORS])
    return records


def transform(bundle: Bundle, records: list[Any]) -> np.ndarray:
    """``bundle``'s feature matrix of ``records``, every value finite.

    Raises:
        RecordError: a record the transform refuses, or a number beyond what the model takes (named as
            ``records[i].column`` with the accepted range).
    """
    x = bundle.transform_records(records)
    check_in_range(bundle, x, records)
    return x


def check_in_range(bundle: Bundle, x: np.ndarray, records: list[Any]) -> None:
    """Refuse the matrix ``x`` of ``records`` if it holds a non-finite feature (a few microseconds when it does not).

    Raises:
        RecordError: one entry per bad value (up to ``MAX_ERRORS``), naming ``records[i].column``.
    """
    finite = np.isfinite(x)
    if finite.all():
        return
    numeric = bundle.transform.numeric
    errors: list[dict[str, str]] = []
    for row, col in zip(*np.nonzero(~finite), strict=True):
        if len(errors) == MAX_ERRORS:
            errors.append({"field": "records", "message": f"more problems not listed (stopped after {MAX_ERRORS})"})
            break
        if col < len(numeric):
            column = numeric[col]
            bound = FLOAT32_MAX * float(column.scale)
            low, high = float(column.center) - bound, float(column.center) + bound
            errors.append({"field": f"records[{row}].{column.name}", "message": (
                f"{records[row].get(column.name)!r} is beyond what the model can take: {column.name} must lie "
                f"between {low:.4g} and {high:.4g} (its scaled value must fit a float32)")})
        else:  # one-hot columns hold 0 or 1: a non-finite value there is a bug of the transform, not of the request
            raise ValueError(f"the feature transform produced a non-finite value in one-hot column {col}")
    raise RecordError(errors)
