"""The formats of captured requests and feedback, shared by the model server that writes them and the monitor
that reads them: store keys, Parquet columns, and the ``POST /feedback`` body.

Keys (:class:`~kiln.tasks.storage.artifacts.ArtifactStore` keys, each a folder holding one file)::

    <pipeline>/_capture/version=<version>/hour=<YYYY-MM-DDTHH>/<batch id>/capture.parquet
    <pipeline>/_feedback/hour=<YYYY-MM-DDTHH>/<batch id>/feedback.parquet

``capture.parquet``: one row per record: ``request_id`` (string, the answer's ``X-Request-Id``), ``record`` (int32,
the record's position in its request), ``received_at`` (timestamp[us, UTC]), ``version``, ``variant``
(``champion``/``canary``), one column per bundle input column as sent (float64 numeric, string categorical, null
when absent), ``predicted_class`` (string, null for regression), ``predicted_value`` (float64: the regression value,
or the probability of ``predicted_class``). ``feedback.parquet``: ``request_id``, ``record`` (int32), ``label``
(string: the class label, or the regression value as text), ``received_at``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

if TYPE_CHECKING:
    from kiln.tasks.serving.inputs import RequestError

CAPTURE_FILE = "capture.parquet"
FEEDBACK_FILE = "feedback.parquet"
#: The ``hour=`` folder names: the UTC hour a row was received in.
HOUR_FORMAT = "%Y-%m-%dT%H"
#: Columns every captured row has before the bundle's input columns (an input column of the same name is left out).
FIXED_COLUMNS = ("request_id", "record", "received_at", "version", "variant", "predicted_class", "predicted_value")
#: Longest label text ``/feedback`` takes.
MAX_LABEL_CHARS = 1024
_TEXT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class CapturedRequest:
    """One captured request: references only (converted in the flush thread)."""

    __slots__ = ("received_at", "request_id", "pipeline", "version", "variant", "bundle", "records", "y")

    def __init__(self, received_at: float, request_id: str, pipeline: str, version: str, variant: str,
                 bundle: Any, records: list[Any], y: np.ndarray):
        self.received_at, self.request_id, self.pipeline = received_at, request_id, pipeline
        self.version, self.variant, self.bundle, self.records, self.y = version, variant, bundle, records, y


@dataclass(frozen=True)
class FeedbackEntry:
    """The labels of one ``/feedback`` request."""

    received_at: float
    request_id: str
    pipeline: str
    labels: list[tuple[int, str]]


def hour_of(epoch_s: float) -> str:
    """The ``hour=`` value of a time: ``YYYY-MM-DDTHH`` in UTC."""
    return datetime.fromtimestamp(epoch_s, UTC).strftime(HOUR_FORMAT)


def capture_hour_key(pipeline: str, version: str, hour: str) -> str:
    """The store key under which the captured batches of one version and one hour are published."""
    return f"{pipeline}/_capture/version={version}/hour={hour}"


def feedback_hour_key(pipeline: str, hour: str) -> str:
    """The store key under which the feedback batches of one hour are published."""
    return f"{pipeline}/_feedback/hour={hour}"


def capture_key(pipeline: str, version: str, hour: str, batch_id: str) -> str:
    """The store key of one captured batch (a folder holding ``capture.parquet``)."""
    return f"{capture_hour_key(pipeline, version, hour)}/{batch_id}"


def feedback_key(pipeline: str, hour: str, batch_id: str) -> str:
    """The store key of one feedback batch (a folder holding ``feedback.parquet``)."""
    return f"{feedback_hour_key(pipeline, hour)}/{batch_id}"


def _request_error(status: int, detail: Any) -> RequestError:
    # Imported here: the monitor imports this module for the layout, and the request parsers load the bundle code.
    from kiln.tasks.serving.inputs import RequestError

    return RequestError(status, detail)


def _category(value: Any) -> str | None:
    # Records were accepted by the transform: str, int, float, bool or None (bool as "True", like training).
    return None if value is None else value if isinstance(value, str) else str(value)


def _column(values: list[Any], kind: Any, convert: Callable[[Any], Any]) -> Any:
    """``values`` as an Arrow array of ``kind``: converted by Arrow in one call when they already fit (the usual
    case: numbers, or strings and nulls; a quarter of the per-value Python conversion's time), else value by value
    with ``convert``."""
    import pyarrow as pa

    try:
        return pa.array(values, kind)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([convert(v) for v in values], kind)


def capture_table(entries: list[CapturedRequest]) -> Any:
    """The Parquet table of captured requests of one bundle (columns: see the monitoring design).

    Returns:
        A ``pyarrow.Table``, one row per record.
    """
    import pyarrow as pa

    transform, classes = entries[0].bundle.transform, entries[0].bundle.classes
    records = [r for e in entries for r in e.records]
    columns: dict[str, Any] = {
        "request_id": pa.array([e.request_id for e in entries for _ in e.records], pa.string()),
        "record": pa.array([i for e in entries for i in range(len(e.records))], pa.int32()),
        "received_at": pa.array([round(e.received_at * 1e6) for e in entries for _ in e.records],
                                pa.timestamp("us", tz="UTC")),
        "version": pa.array([e.version for e in entries for _ in e.records], pa.string()),
        "variant": pa.array([e.variant for e in entries for _ in e.records], pa.string())}
    for column in transform.numeric:
        if column.name not in FIXED_COLUMNS:
            columns[column.name] = _column([r.get(column.name) for r in records], pa.float64(),
                                           lambda v: None if v is None else float(v))
    for column in transform.categorical:
        if column.name not in FIXED_COLUMNS:
            columns[column.name] = _column([r.get(column.name) for r in records], pa.string(), _category)
    y = np.concatenate([e.y for e in entries])
    if classes is None:
        columns["predicted_class"] = pa.nulls(len(y), pa.string())
        columns["predicted_value"] = pa.array(y.astype(np.float64), pa.float64())
    else:
        best = y.argmax(axis=1)
        columns["predicted_class"] = pa.array(np.asarray(classes, dtype=object)[best], pa.string())
        columns["predicted_value"] = pa.array(y[np.arange(len(y)), best].astype(np.float64), pa.float64())
    return pa.table(columns)


def feedback_table(entries: list[FeedbackEntry]) -> Any:
    """The Parquet table of feedback: ``request_id``, ``record`` (int32), ``label``, ``received_at``."""
    import pyarrow as pa

    rows = [(e.request_id, record, label, round(e.received_at * 1e6)) for e in entries for record, label in e.labels]
    ids, records, labels, times = zip(*rows, strict=True) if rows else ((), (), (), ())
    return pa.table({"request_id": pa.array(ids, pa.string()), "record": pa.array(records, pa.int32()),
                     "label": pa.array(labels, pa.string()),
                     "received_at": pa.array(times, pa.timestamp("us", tz="UTC"))})


def _label_text(value: Any, field: str) -> str:
    if isinstance(value, str) and 0 < len(value) <= MAX_LABEL_CHARS:
        return value
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return repr(float(value)) if isinstance(value, float) else str(value)
    raise _request_error(422, [{"field": field, "message": f"a label must be a class label (a string of 1 to "
                                                         f"{MAX_LABEL_CHARS} characters) or a finite number, "
                                                         f"found {str(value)[:40]!r}"}])


def parse_feedback(body: bytes, max_records: int) -> tuple[str, list[tuple[int, str]]]:
    """The request id and ``(record, label text)`` pairs of a ``/feedback`` body: ``{"request_id": ..., "labels":
    [one per record]}`` or ``{"request_id": ..., "record": 0, "label": ...}``.

    Raises:
        RequestError: 422 naming the field, or 413 for more than ``max_records`` labels.
    """
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _request_error(422, [{"field": "body", "message": f"is not valid JSON: {exc}"}]) from exc
    shapes = ({"request_id", "labels"}, {"request_id", "record", "label"})
    if not isinstance(payload, dict) or set(payload) not in shapes:
        raise _request_error(422, [{"field": "body", "message": 'must be {"request_id": ..., "labels": [...]} or '
                                                             '{"request_id": ..., "record": 0, "label": ...}'}])
    request_id = payload["request_id"]
    if not isinstance(request_id, str) or not _TEXT_ID.fullmatch(request_id):
        raise _request_error(422, [{"field": "request_id", "message": "must be the X-Request-Id of a /predict "
                                                                   "answer (1-64 of A-Z a-z 0-9 . _ -)"}])
    if "labels" in payload:
        labels = payload["labels"]
        if not isinstance(labels, list) or not labels:
            raise _request_error(422, [{"field": "labels", "message": "must be a non-empty list, one per record"}])
        if len(labels) > max_records:
            raise _request_error(413, f"at most {max_records} labels per request, found {len(labels)}")
        return request_id, [(i, _label_text(v, f"labels[{i}]")) for i, v in enumerate(labels)]
    record = payload["record"]
    if isinstance(record, bool) or not isinstance(record, int) or not 0 <= record < max_records:
        raise _request_error(422, [{"field": "record", "message": f"must be an integer in [0, {max_records})"}])
    return request_id, [(record, _label_text(payload["label"], "label"))]
