"""Traffic capture and feedback: a sample of answered requests, and the ground truth later sent for them, written to
the artifact store as Parquet for the monitor to read.

**Request ids.** Every ``/predict`` answer carries ``X-Request-Id``. Whether an id is *known* to ``/feedback`` (its
request was captured) must be decidable by any replica, before or after a restart, without shared state, so the
ids carry their own proof (:class:`RequestIds`; the secret is derived from the kiln token, which every replica of a
pipeline shares):

* a request without its own id that is sampled gets ``<20 random hex><12 hex MAC(secret, random)>``; one that is
  not sampled gets a plain uuid4 hex, which fails that check;
* a caller's own ``X-Request-Id`` (1-64 of ``[A-Za-z0-9._-]``) is kept, and the request is captured when
  ``MAC(secret, id)`` read as a fraction lies below the capture share: sampling by the id itself, so
  ``/feedback`` can redo the decision. Requests behind a proxy that stamps every request with an id (Envoy, nginx)
  are therefore still sampled; a caller id is known while the share is not lowered below what sampled it, and
  a caller id of 32 lower-case hex (the server's own form) is judged as a server id (so almost never captured).

The MAC is keyed BLAKE2b (``hashlib.blake2b(key=...)``, a MAC by design): built into CPython, 1.5 µs a call here
where ``hmac.digest(..., "sha256")`` costs 4.8 µs (OpenSSL 3 looks the digest up on every call), and it runs on
every sampled request and every request that brings its own id. The random part needs no secrecy (the tag is the
proof), so it comes from the same fast generator as the plain ids.

**Buffers.** A captured request is one O(1) append (references to its records and a copy of its output rows) to a
bounded buffer; conversion and writing happen in a worker thread (``asyncio.to_thread``), every ``flush_s`` or
once ``flush_rows`` rows wait, and on shutdown. Keys and columns are fixed by the monitoring design::

    <pipeline>/_capture/version=<version>/hour=<YYYY-MM-DDTHH>/<batch id>/capture.parquet
    <pipeline>/_feedback/hour=<YYYY-MM-DDTHH>/<batch id>/feedback.parquet

with ``<batch id>`` = ``<UTC yyyymmddThhmmss>-<server id 8 hex>-<seq 6 digits>`` (columns:
:mod:`.capture_format`). Bounded memory wins over completeness: a full buffer drops new rows, and a flush that
fails drops its rows; both are counted (``kiln_capture_dropped_total{reason}``) and the failure is logged, at most
once per interval.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from kiln.tasks.serving.capture_format import (
    CAPTURE_FILE,
    FEEDBACK_FILE,
    CapturedRequest,
    FeedbackEntry,
    capture_key,
    capture_table,
    feedback_key,
    feedback_table,
    hour_of,
)
from kiln.tasks.serving.metrics import ServerMetrics, ThrottledLog
from kiln.tasks.storage.artifacts import ArtifactStore

log = logging.getLogger(__name__)

_CALLER_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")
_SERVER_ID = re.compile(r"[0-9a-f]{32}")
_FRACTION_HEX = 13  # 52 bits: exact in a float
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))  # the version and variant fields of a uuid
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


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
        token: the kiln token; the MAC's secret is derived from it, so every replica and restart agrees.
    """

    #: Random bits from an OS-seeded generator, for the plain ids and the random part of minted ones (neither needs
    #: cryptographic randomness: the MAC is the proof; ``uuid.uuid4()`` and ``secrets`` cost microseconds per
    #: request on the hot path).
    _bits = random.Random().getrandbits

    def __init__(self, token: str):
        self._secret = hmac.new(token.encode(), b"kiln capture request ids 2", hashlib.sha256).digest()

    def _tag(self, text: str) -> str:
        return hashlib.blake2b(text.encode(), key=self._secret, digest_size=16).hexdigest()

    def mint(self) -> str:
        """A new id of a captured request (32 hex)."""
        random_part = f"{self._bits(80):020x}"
        return random_part + self._tag(random_part)[:12]

    @classmethod
    def plain(cls) -> str:
        """A new id of a request that is not captured: a random uuid4, as 32 hex."""
        bits = cls._bits(128) & _UUID4_CLEAR | _UUID4_SET
        return f"{bits:032x}"

    def is_captured(self, request_id: str, share: float) -> bool:
        """Whether ``request_id`` names a captured request (a server id with a valid tag, or a caller id that the
        ``share`` samples)."""
        if _SERVER_ID.fullmatch(request_id):
            return hmac.compare_digest(request_id[20:], self._tag(request_id[:20])[:12])
        fraction = int(self._tag("caller:" + request_id)[:_FRACTION_HEX], 16) / 16 ** _FRACTION_HEX
        return fraction < share


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

        Returns:
            The request's id for its ``X-Request-Id``: the caller's, a minted one (captured), or a plain uuid4 hex.
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
        # A copy of the rows: the output may be a view that keeps a whole batch's array alive.
        entry = CapturedRequest(received_at, request_id, pipeline, variant.version, variant.role, variant.bundle,
                                records, y.copy())
        buffer = self._buffers[_CAPTURES.name]
        if buffer.add(entry, len(records), nbytes):
            self.metrics.capture_records.inc(len(records))
            if buffer.rows >= self.options.flush_rows:
                self._wake.set()
        else:
            self.metrics.capture_dropped["full"].inc(len(records))
        return request_id

    def add_feedback(self, pipeline: str, request_id: str, labels: list[tuple[int, str]], nbytes: int) -> bool:
        """Buffer the labels of a known request; ``False`` when the feedback buffer is full (nothing kept)."""
        buffer = self._buffers[_FEEDBACK.name]
        if not buffer.add(FeedbackEntry(time.time(), request_id, pipeline, labels), len(labels), nbytes):
            self.metrics.capture_dropped["feedback_full"].inc(len(labels))
            return False
        if buffer.rows >= self.options.flush_rows:
            self._wake.set()
        return True

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
