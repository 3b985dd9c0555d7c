"""The source watcher's polling and state, without Airflow: what the source holds now, what changed since the last
look, and the last-seen state kept in the artifact store so that a restarted watcher neither misses nor repeats a
change.

What is compared, per source kind:

* a file, a folder of partition files, an S3 object or prefix: the listing (:func:`kiln.tasks.sources.list_source`),
  part by part. A part that is new, or whose etag (S3 ETag; sha256 of a local file's bytes) or size changed, is a
  change; the event lists those parts (``name``, ``etag``, ``size``) and the ``root`` their names are relative
  to. Parts that only disappeared are recorded without an event.
* a SQL source: ``SELECT max(<watermark_column>) FROM (<query>) AS q`` with ``:data_interval_start`` bound to the
  Unix epoch and ``:data_interval_end`` to now. A larger value is a change (the event carries it); a smaller one
  (rows deleted) becomes the new mark without an event, so later rows above it are not missed.

The first look (no state yet, or the state of another source) only records the baseline: data already there when
the watch starts does not start a run. An empty folder or S3 prefix is a state with no parts (its first
partition starts a run), not an error.

State: ``<pipeline>/_watch/state.json`` in the artifact store, published atomically (the store's writer). The
caller decides when a change's state is saved (:meth:`SourceWatcher.commit`): kiln's trigger commits it only after
Airflow confirms that the Asset event is stored, so a crash in between repeats the change (at least once) rather
than losing it.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.tasks.sources.errors import SourceEmptyError, SourceReadError
from kiln.tasks.storage.artifacts import ArtifactNotFoundError, read_json, write_json

if TYPE_CHECKING:
    from kiln.tasks.sources.listing import SourceListing
    from kiln.tasks.spec import SourceSpec
    from kiln.tasks.storage.artifacts import ArtifactStore

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

ConnectionUrl = Callable[[str], str]


class WatchError(SourceReadError):
    """The watcher cannot look at its source (e.g. a watermark column the query does not return); the message
    names the column or object and the fix."""


def watch_key(pipeline: str) -> str:
    """The artifact key of ``pipeline``'s watcher state."""
    return f"{pipeline}/_watch"


@dataclass(frozen=True)
class WatchState:
    """What the watcher last saw of one source."""

    source: str
    """Which source this is the state of: the URI, or for SQL the connection, a digest of the query and the
    column (a state of another source is not compared with)."""
    parts: Mapping[str, tuple[str, int]] | None = None
    """Listing sources: part name -> (etag, size)."""
    watermark: Any = None
    """SQL sources: the largest watermark value (JSON form: numbers, text, ISO timestamps), None when no row."""
    watermark_type: str | None = None
    """How :attr:`watermark` compares: ``number``, ``decimal``, ``datetime``, ``date`` or ``text``."""
    root: str = ""
    """Listing sources: where the part names are relative to (a folder, or ``s3://bucket/prefix/``)."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to ``state.json``."""
        out: dict[str, Any] = {"source": self.source}
        if self.parts is not None:
            out["parts"] = {name: {"etag": etag, "size": size} for name, (etag, size) in sorted(self.parts.items())}
            out["root"] = self.root
        else:
            out["watermark"], out["watermark_type"] = self.watermark, self.watermark_type
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WatchState:
        """Read back :meth:`to_dict`'s output."""
        parts = d.get("parts")
        return cls(source=str(d["source"]),
                   parts=None if parts is None else {n: (str(p["etag"]), int(p["size"])) for n, p in parts.items()},
                   watermark=d.get("watermark"), watermark_type=d.get("watermark_type"), root=str(d.get("root", "")))


@dataclass(frozen=True)
class Observation:
    """One look at the source: its state now and, when that is new data, the event payload to emit."""

    state: WatchState
    payload: dict[str, Any] | None = None
    """``{"uri", "root", "parts": [{name, etag, size}, ...]}`` (the new or changed parts; names relative to
    ``root``) or ``{"uri", "watermark", "previous"}``; None: nothing to start a run for (no change, a baseline,
    or only removals)."""


def source_identity(source: SourceSpec, pipeline: str) -> str:
    """What :attr:`WatchState.source` holds for ``source`` (a changed query or column starts a new baseline)."""
    if source.sql is None:
        return str(source.uri)
    digest = hashlib.sha256(f"{source.sql.query}\0{source.sql.watermark_column}".encode()).hexdigest()[:16]
    return f"{source.asset_uri(pipeline)}#{digest}"


def listing_state(identity: str, listing: SourceListing) -> WatchState:
    """The state of a listed source."""
    return WatchState(source=identity, parts={p.name: (p.etag, p.size) for p in listing.parts}, root=listing.root)


def diff(previous: WatchState | None, current: WatchState, uri: str) -> Observation:
    """Compare ``current`` with the last state seen.

    Args:
        previous: the last state (None: none yet).
        current: the state now.
        uri: the source's URI (or Asset URI for SQL), put in the payload.

    Returns:
        The observation: a payload when there is new data, none for a baseline, no change or only removals.
    """
    if previous is None or previous.source != current.source:
        return Observation(current)
    if current.parts is not None:
        before = previous.parts or {}
        changed = [{"name": name, "etag": etag, "size": size} for name, (etag, size) in sorted(current.parts.items())
                   if before.get(name) != (etag, size)]
        return Observation(current, {"uri": uri, "root": current.root, "parts": changed} if changed else None)
    if current.watermark is None or _as_comparable(current) == _as_comparable(previous):
        return Observation(current)
    if previous.watermark is None or _as_comparable(current) > _as_comparable(previous):
        return Observation(current, {"uri": uri, "watermark": current.watermark, "previous": previous.watermark})
    log.warning("the watermark of %s went down from %s to %s (rows deleted?): it is the new mark, no run starts",
                uri, previous.watermark, current.watermark)
    return Observation(current)


def _as_comparable(state: WatchState) -> Any:
    """The watermark as a value that orders like the database's (JSON keeps timestamps as ISO text)."""
    value, kind = state.watermark, state.watermark_type
    if value is None:
        return None
    if kind == "datetime":
        parsed = dt.datetime.fromisoformat(value)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
    if kind == "date":
        return dt.date.fromisoformat(value)
    if kind == "decimal":
        return decimal.Decimal(value)
    return value


def watermark_json(value: Any) -> tuple[Any, str | None]:
    """A database value as (JSON-safe value, its type for comparing)."""
    if value is None:
        return None, None
    if isinstance(value, bool):
        return int(value), "number"
    if isinstance(value, int | float):
        return value, "number"
    if isinstance(value, decimal.Decimal):
        return str(value), "decimal"
    if isinstance(value, dt.datetime):
        return value.isoformat(), "datetime"
    if isinstance(value, dt.date):
        return value.isoformat(), "date"
    return str(value), "text"


def sql_watermark(source: SourceSpec, connection_url: ConnectionUrl, now: dt.datetime | None = None) -> Any:
    """The largest ``source.sql.watermark_column`` over the query, with the data interval from the Unix epoch to
    ``now``.

    Raises:
        WatchError: no watermark column declared, or the query does not return it (naming the columns it returns).
        LookupError: the connection cannot be resolved (the resolver's error, which names it).
    """
    import sqlalchemy as sa

    sql = source.sql
    if sql is None or not sql.watermark_column:
        raise WatchError("source.watch on a SQL source needs source.sql.watermark_column")
    engine = sa.create_engine(connection_url(sql.conn_id), poolclass=sa.pool.NullPool)
    params = {"data_interval_start": EPOCH, "data_interval_end": now or dt.datetime.now(dt.UTC)}
    inner = sql.query.strip().rstrip(";")
    try:
        with engine.connect() as conn:
            columns = list(conn.execute(sa.text(f"SELECT * FROM ({inner}) AS q LIMIT 0"), params).keys())
            if sql.watermark_column not in columns:
                raise WatchError(f"source.sql.watermark_column '{sql.watermark_column}' is not a column of the "
                                 f"query on connection '{sql.conn_id}' (it returns: {', '.join(columns) or 'none'}); "
                                 "name one of them, or add the column to the query")
            column = engine.dialect.identifier_preparer.quote(sql.watermark_column)
            return conn.execute(sa.text(f"SELECT max({column}) FROM ({inner}) AS q"), params).scalar()
    finally:
        engine.dispose()


@dataclass
class SourceWatcher:
    """Polls one pipeline's source and keeps its state in the artifact store.

    Args:
        source: the spec's ``source``.
        pipeline: the pipeline's name (the state's key).
        store: the artifact store.
        connection_url: resolves a SQL source's connection id to a SQLAlchemy URL.
        roots: the data roots of local sources.
    """

    source: SourceSpec
    pipeline: str
    store: ArtifactStore
    connection_url: ConnectionUrl | None = None
    roots: tuple[Path, ...] | None = None
    _last: WatchState | None = field(default=None, init=False)
    _loaded: bool = field(default=False, init=False)
    _pending: int = field(default=0, init=False)
    """Changes emitted whose state is not committed yet."""
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    """Polls and commits run in worker threads of their own."""

    @property
    def uri(self) -> str:
        """The URI events name: the source URI, or the Asset URI of a SQL source."""
        return self.source.asset_uri(self.pipeline)

    def look(self) -> WatchState:
        """The source's state now (one listing or one watermark query).

        Raises:
            SourceReadError: the source cannot be listed or queried (the message names it and the fix).
        """
        identity = source_identity(self.source, self.pipeline)
        if self.source.sql is not None:
            if self.connection_url is None:
                raise WatchError("a SQL source needs a connection resolver")
            value, kind = watermark_json(sql_watermark(self.source, self.connection_url))
            return WatchState(source=identity, watermark=value, watermark_type=kind)
        from kiln.tasks.sources.listing import list_source

        try:
            return listing_state(identity, list_source(self.source, self.roots))
        except SourceEmptyError:  # a landing folder or prefix before its first delivery: wait for it
            return WatchState(source=identity, parts={})

    def poll(self) -> Observation:
        """Look at the source and compare it with the last state (the saved one after a restart).

        A change's state becomes the one compared with next, and is saved by :meth:`commit` once its event is
        stored. A state without an event (the baseline, only removals, a lower watermark) is saved at once, unless
        a change is still waiting for its commit: it includes that change, which must not be saved before its
        event is stored (the commit saves the change; a removal is seen again after a restart).

        Raises:
            SourceReadError: the source cannot be listed or queried.
        """
        current = self.look()
        with self._lock:
            if not self._loaded:
                self._last, self._loaded, self._pending = load_state(self.store, self.pipeline), True, 0
            observation = diff(self._last, current, self.uri)
            if observation.payload is not None:
                self._pending += 1
            elif observation.state != self._last and self._pending == 0:
                if self._last is None or self._last.source != observation.state.source:
                    log.info("watching %s: baseline recorded (%s); later changes start runs", self.uri,
                             _describe(observation.state))
                save_state(self.store, self.pipeline, observation.state)
            self._last = observation.state
        return observation

    def commit(self, state: WatchState) -> None:
        """Save ``state`` (of an emitted change) as the last seen: a restart compares with it."""
        with self._lock:
            save_state(self.store, self.pipeline, state)
            self._pending = max(0, self._pending - 1)

    def rewind(self) -> None:
        """Forget the states not committed: the next :meth:`poll` compares with the saved state again, so a change
        whose event was not stored is emitted again."""
        with self._lock:
            self._loaded = False


def _describe(state: WatchState) -> str:
    if state.parts is not None:
        return f"{len(state.parts)} part(s)"
    return f"watermark {state.watermark!r}"


def load_state(store: ArtifactStore, pipeline: str) -> WatchState | None:
    """The saved state of ``pipeline``'s watcher, or None."""
    try:
        folder = store.path(watch_key(pipeline))
    except ArtifactNotFoundError:
        return None
    return WatchState.from_dict(read_json(folder / STATE_FILE))


def save_state(store: ArtifactStore, pipeline: str, state: WatchState) -> None:
    """Publish ``state`` as ``<pipeline>/_watch/state.json`` (atomically: readers see the old or the new one)."""
    with store.writer(watch_key(pipeline)) as out:
        write_json(out / STATE_FILE, {**state.to_dict(), "saved_at": dt.datetime.now(dt.UTC).isoformat()})


def payload_json(payload: Mapping[str, Any]) -> str:
    """The payload as compact JSON (for logs)."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True)
