"""Traffic capture and feedback: a sample of answered requests, and the ground truth later sent for them, written to
the artifact store as Parquet for the monitor to read.

**Request ids.** Every ``/predict`` answer carries ``X-Request-Id``. Whether an id is *known* to ``/feedback`` (its
request was captured) must be decidable by any replica, before or after a restart, without shared state, so the
ids carry their own proof (:class:`RequestIds`; the secret is derived from the kiln token, which every replica of a
pipeline shares):

* a request without its own id that is sampled gets ``<20 random hex><12 hex HMAC-SHA256(secret, random)>``; one
  that is not sampled gets a plain uuid4 hex, which fails that check;
* a caller's own ``X-Request-Id`` (1-64 of ``[A-Za-z0-9._-]``) is kept, and the request is captured when
  ``HMAC-SHA256(secret, id)`` read as a fraction lies below the capture share: sampling by the id itself, so
  ``/feedback`` can redo the decision. Requests behind a proxy that stamps every request with an id (Envoy, nginx)
  are therefore still sampled; a caller id is known while the share is not lowered below what sampled it, and
  a caller id of 32 lower-case hex (the server's own form) is judged as a server id (so almost never captured).

**Buffers.** A captured request is one O(1) append (references to its records and a copy of its output rows) to a
bounded buffer; conversion and writing happen in a worker thread (``asyncio.to_thread``), every ``flush_s`` or
once ``flush_rows`` rows wait, and on shutdown. Keys and columns are fixed by the monitoring design::

    <pipeline>/_capture/version=<version>/hour=<YYYY-MM-DDTHH>/<batch id>/capture.parquet
    <pipeline>/_feedback/hour=<YYYY-MM-DDTHH>/<batch id>/feedback.parquet

with ``<batch id>`` = ``<UTC yyyymmddThhmmss>-<server id 8 hex>-<seq 6 digits>``. Memory is bounded before
completeness: a full buffer drops new rows, and a flush that fails drops its rows; both are counted
(``kiln_capture_dropped_total{reason}``) and the failure is logged, at most once per interval.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

from kiln.tasks.serving.inputs import RequestError
from kiln.tasks.serving.metrics import ServerMetrics, ThrottledLog
from kiln.tasks.storage.artifacts import ArtifactStore

log = logging.getLogger(__name__)

CAPTURE_FILE = "capture.parquet"
FEEDBACK_FILE = "feedback.parquet"
#: Columns every captured row has before the bundle's input columns (an input column of the same name is left out).
FIXED_COLUMNS = ("request_id", "record", "received_at", "version", "variant", "predicted_class", "predicted_value")
#: Longest label text ``/feedback`` takes.
MAX_LABEL_CHARS = 1024
_CALLER_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")
_TEXT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SERVER_ID = re.compile(r"[0-9a-f]{32}")
_FRACTION_HEX = 13  # 52 bits: exact in a float


def caller_request_id(raw_headers: list[tuple[bytes, bytes]]) -> str | None:
    """The caller's own ``X-Request-Id`` when it is 1-64 of ``[A-Za-z0-9._-]``; ``None`` otherwise (then the
    server makes one: an invalid id is replaced, not refused, since proxies add ids the caller never chose)."""
    for name, value in raw_headers:
        if name == b"x-request-id":
            return value.decode() if _CALLER_ID.fullmatch(value) else None
    return None


class RequestIds:
    """Request ids that prove whether their request was captured (see the module docstring).

    Args:
        token: the kiln token; the HMAC secret is derived from it, so every replica and restart agrees.
    """

    def __init__(self, token: str):
        self._secret = hmac.new(token.encode(), b"kiln capture request ids 1", hashlib.sha256).digest()

    def _tag(self, text: str) -> str:
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()

    def mint(self) -> str:
        """A new id of a captured request (32 hex)."""
        random_part = secrets.token_hex(10)
        return random_part + self._tag(random_part)[:12]

    @staticmethod
    def plain() -> str:
        """A new id of a request that is not captured (uuid4 hex)."""
        return uuid.uuid4().hex

    def is_captured(self, request_id: str, share: float) -> bool:
        """Whether ``request_id`` names a captured request (a server id with a valid tag, or a caller id that the
        ``share`` samples)."""
        if _SERVER_ID.fullmatch(request_id):
            return hmac.compare_digest(request_id[20:], self._tag(request_id[:20])[:12])
        fraction = int(self._tag("caller:" + request_id)[:_FRACTION_HEX], 16) / 16 ** _FRACTION_HEX
        return fraction < share


class _Captured:
    """One captured request: references only (converted in the flush thread)."""

    __slots__ = ("received_at", "request_id", "pipeline", "version", "variant", "bundle", "records", "y")

    def __init__(self, received_at: float, request_id: str, pipeline: str, version: str, variant: str,
                 bundle: Any, records: list[Any], y: np.ndarray):
        self.received_at, self.request_id, self.pipeline = received_at, request_id, pipeline
        self.version, self.variant, self.bundle, self.records, self.y = version, variant, bundle, records, y


@dataclass(frozen=True)
class _Feedback:
    received_at: float
    request_id: str
    pipeline: str
    labels: list[tuple[int, str]]


class _Buffer:
    """Entries waiting to be written, bounded in rows and request bytes (those being written count too)."""

    def __init__(self, max_rows: int, max_bytes: int):
        self.max_rows, self.max_bytes = max_rows, max_bytes
        self.entries: list[Any] = []
        self.rows = self.nbytes = 0  # waiting
        self.writing_rows = self.writing_bytes = 0  # taken by the write in progress
        self.oldest: float | None = None
        self.writing_oldest: float | None = None

    @property
    def held_rows(self) -> int:
        """Rows in memory: waiting or being written."""
        return self.rows + self.writing_rows

    def add(self, entry: Any, rows: int, nbytes: int) -> bool:
        if self.held_rows + rows > self.max_rows or self.nbytes + self.writing_bytes + nbytes > self.max_bytes:
            return False
        self.entries.append(entry)
        self.rows += rows
        self.nbytes += nbytes
        if self.oldest is None:
            self.oldest = time.monotonic()
        return True

    def take(self) -> list[Any]:
        """The waiting entries, now counted as being written until :meth:`release`."""
        entries, self.entries = self.entries, []
        self.writing_rows, self.writing_bytes, self.writing_oldest = self.rows, self.nbytes, self.oldest
        self.rows = self.nbytes = 0
        self.oldest = None
        return entries

    def release(self) -> None:
        """The write of the taken entries ended (written or dropped)."""
        self.writing_rows = self.writing_bytes = 0
        self.writing_oldest = None

    def oldest_age(self, now: float) -> float:
        times = [t for t in (self.oldest, self.writing_oldest) if t is not None]
        return now - min(times) if times else 0.0


def hour_of(epoch_s: float) -> str:
    """The ``hour=`` value of a time: ``YYYY-MM-DDTHH`` in UTC."""
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H")


def capture_key(pipeline: str, version: str, hour: str, batch_id: str) -> str:
    """The store key of one captured batch (a folder holding ``capture.parquet``)."""
    return f"{pipeline}/_capture/version={version}/hour={hour}/{batch_id}"


def feedback_key(pipeline: str, hour: str, batch_id: str) -> str:
    """The store key of one feedback batch (a folder holding ``feedback.parquet``)."""
    return f"{pipeline}/_feedback/hour={hour}/{batch_id}"


def _category(value: Any) -> str | None:
    # Records were accepted by the transform: str, int, float, bool or None (bool as "True", like training).
    return None if value is None else value if isinstance(value, str) else str(value)


def capture_table(entries: list[_Captured]) -> Any:
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
            values = [r.get(column.name) for r in records]
            columns[column.name] = pa.array([None if v is None else float(v) for v in values], pa.float64())
    for column in transform.categorical:
        if column.name not in FIXED_COLUMNS:
            columns[column.name] = pa.array([_category(r.get(column.name)) for r in records], pa.string())
    y = np.concatenate([e.y for e in entries])
    if classes is None:
        columns["predicted_class"] = pa.nulls(len(y), pa.string())
        columns["predicted_value"] = pa.array(y.astype(np.float64), pa.float64())
    else:
        best = y.argmax(axis=1)
        columns["predicted_class"] = pa.array(np.asarray(classes, dtype=object)[best], pa.string())
        columns["predicted_value"] = pa.array(y[np.arange(len(y)), best].astype(np.float64), pa.float64())
    return pa.table(columns)


def feedback_table(entries: list[_Feedback]) -> Any:
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
    raise RequestError(422, [{"field": field, "message": f"a label must be a class label (a string of 1 to "
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
        raise RequestError(422, [{"field": "body", "message": f"is not valid JSON: {exc}"}]) from exc
    shapes = ({"request_id", "labels"}, {"request_id", "record", "label"})
    if not isinstance(payload, dict) or set(payload) not in shapes:
        raise RequestError(422, [{"field": "body", "message": 'must be {"request_id": ..., "labels": [...]} or '
                                                             '{"request_id": ..., "record": 0, "label": ...}'}])
    request_id = payload["request_id"]
    if not isinstance(request_id, str) or not _TEXT_ID.fullmatch(request_id):
        raise RequestError(422, [{"field": "request_id", "message": "must be the X-Request-Id of a /predict "
                                                                   "answer (1-64 of A-Z a-z 0-9 . _ -)"}])
    if "labels" in payload:
        labels = payload["labels"]
        if not isinstance(labels, list) or not labels:
            raise RequestError(422, [{"field": "labels", "message": "must be a non-empty list, one per record"}])
        if len(labels) > max_records:
            raise RequestError(413, f"at most {max_records} labels per request, found {len(labels)}")
        return request_id, [(i, _label_text(v, f"labels[{i}]")) for i, v in enumerate(labels)]
    record = payload["record"]
    if isinstance(record, bool) or not isinstance(record, int) or not 0 <= record < max_records:
        raise RequestError(422, [{"field": "record", "message": f"must be an integer in [0, {max_records})"}])
    return request_id, [(record, _label_text(payload["label"], "label"))]


@dataclass(frozen=True)
class CaptureOptions:
    """Bounds and pace of the capture buffers (the server's ``--capture-*`` flags)."""

    max_rows: int = 50_000
    """Most records (and, separately, feedback rows) held in memory; past it new ones are dropped and counted."""
    max_bytes: int = 32 << 20
    """Most request-body bytes held by captured requests (records are kept as parsed, so bodies bound them)."""
    flush_rows: int = 10_000
    """A flush starts once this many rows wait."""
    flush_s: float = 10.0
    """Seconds between two flushes."""

    def __post_init__(self) -> None:
        if not (self.max_rows >= 1 and self.max_bytes >= 1 and self.flush_rows >= 1 and self.flush_s > 0):
            raise ValueError(f"capture bounds must be positive, found {self}")


@dataclass(frozen=True)
class _Kind:
    """What differs between captured records and feedback rows; the buffering and flushing are shared."""

    name: str
    file: str
    table: Callable[[list[Any]], Any]
    key: Callable[[Any, str], str]
    """The store key of an entry's batch, given the batch id."""
    rows: Callable[[Any], int]
    drop_full: str
    drop_failed: str


_CAPTURES = _Kind("captured records", CAPTURE_FILE, capture_table,
                  lambda e, batch: capture_key(e.pipeline, e.version, hour_of(e.received_at), batch),
                  lambda e: len(e.records), "full", "flush_failed")
_FEEDBACK = _Kind("feedback rows", FEEDBACK_FILE, feedback_table,
                  lambda e, batch: feedback_key(e.pipeline, hour_of(e.received_at), batch),
                  lambda e: len(e.labels), "feedback_full", "feedback_flush_failed")


class Capture:
    """The capture and feedback buffers of one server and the task that writes them to the store.

    Args:
        store: where batches are published (``store.writer``: atomically, local folder or S3).
        token: the kiln token (the request ids' secret is derived from it).
        metrics: the server's metrics (``kiln_capture_*``, ``kiln_feedback_total``).
        random: the server's seeded random (which requests are sampled).
        options: bounds and pace.
    """

    def __init__(self, store: ArtifactStore, token: str, metrics: ServerMetrics, random: Callable[[], float],
                 options: CaptureOptions | None = None):
        self.store, self.metrics, self.random = store, metrics, random
        self.options = options or CaptureOptions()
        self.ids = RequestIds(token)
        self.server_id = secrets.token_hex(4)
        self._seq = 0
        self._buffers = {_CAPTURES.name: _Buffer(self.options.max_rows, self.options.max_bytes),
                         _FEEDBACK.name: _Buffer(self.options.max_rows, self.options.max_bytes)}
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._log_failure = ThrottledLog(log, logging.ERROR)
        metrics.watch_capture(lambda: sum(b.held_rows for b in self._buffers.values()),
                              lambda: max(b.oldest_age(time.monotonic()) for b in self._buffers.values()))

    def answered(self, pipeline: str, share: float, variant: Any, records: list[Any], y: np.ndarray,
                 caller_id: str | None, started: float, nbytes: int) -> str:
        """Sample an answered request and, if sampled, buffer it (O(1)); its request id either way.

        Args:
            pipeline: the deployment's model name.
            share: the deployment's capture share.
            variant: the :class:`~kiln.tasks.serving.models.Variant` that answered.
            records: the request's records; ``y`` its output rows.
            caller_id: the caller's valid ``X-Request-Id``, if any.
            started: ``time.perf_counter()`` when the request arrived.
            nbytes: the request body's size.
        """
        if caller_id is None:
            if not (share > 0 and self.random() < share):
                return RequestIds.plain()
            request_id = self.ids.mint()
        else:
            request_id = caller_id
            if not (share > 0 and self.ids.is_captured(caller_id, share)):
                return request_id
        received_at = time.time() - (time.perf_counter() - started)
        entry = _Captured(received_at, request_id, pipeline, variant.version, variant.role, variant.bundle, records,
                          y.copy())  # a copy: the output may be a view that keeps a whole batch's array alive
        if self._buffers[_CAPTURES.name].add(entry, len(records), nbytes):
            self.metrics.capture_records.inc(len(records))
            self._wake_if_due()
        else:
            self.metrics.capture_dropped["full"].inc(len(records))
        return request_id

    def add_feedback(self, pipeline: str, request_id: str, labels: list[tuple[int, str]], nbytes: int) -> bool:
        """Buffer the labels of a known request; ``False`` when the feedback buffer is full (nothing kept)."""
        if not self._buffers[_FEEDBACK.name].add(_Feedback(time.time(), request_id, pipeline, labels), len(labels),
                                                 nbytes):
            self.metrics.capture_dropped["feedback_full"].inc(len(labels))
            return False
        self._wake_if_due()
        return True

    def _wake_if_due(self) -> None:
        if any(b.rows >= self.options.flush_rows for b in self._buffers.values()):
            self._wake.set()

    def start(self) -> None:
        """Start the flush task (on the running event loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop the flush task (after the write in progress) and write what is left."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await self.flush()

    async def _run(self) -> None:
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), self.options.flush_s)
            except TimeoutError:
                pass
            self._wake.clear()
            if not self._closing:
                await self.flush()

    async def flush(self) -> None:
        """Write every waiting entry, in a worker thread (conversion holds no event-loop time)."""
        for kind in (_CAPTURES, _FEEDBACK):
            buffer = self._buffers[kind.name]
            entries = buffer.take()
            if not entries:
                continue
            try:
                await asyncio.to_thread(self._write, kind, entries)
            finally:
                buffer.release()

    def _next_batch_id(self) -> str:
        self._seq += 1
        return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{self.server_id}-{self._seq % 1_000_000:06d}"

    def _write(self, kind: _Kind, entries: list[Any]) -> None:
        """Write ``entries`` as one file per store key (runs in a worker thread); a failing file's rows are
        dropped and counted (bounded memory wins over completeness) and the failure logged, throttled."""
        import pyarrow.parquet as pq

        groups: dict[tuple[str, int], list[Any]] = {}
        for entry in entries:
            # One file per key and per bundle: a version reloaded from another folder may have other inputs.
            bundle = id(entry.bundle) if kind is _CAPTURES else 0
            groups.setdefault((kind.key(entry, ""), bundle), []).append(entry)
        for (prefix, _), group in groups.items():
            key = prefix + self._next_batch_id()
            try:
                table = kind.table(group)
                with self.store.writer(key) as folder:
                    pq.write_table(table, folder / kind.file)
            except Exception as exc:  # noqa: BLE001 - any failure drops this file's rows: counted, logged, survived
                rows = sum(kind.rows(e) for e in group)
                self.metrics.capture_flushes["failed"].inc()
                self.metrics.capture_dropped[kind.drop_failed].inc(rows)
                self._log_failure("writing %d %s under %s failed; they are dropped: %s", rows, kind.name, key, exc,
                                  exc_info=exc)
                continue
            self.metrics.capture_flushes["ok"].inc()
            log.debug("wrote %d %s to %s", table.num_rows, kind.name, self.store.uri(key))
