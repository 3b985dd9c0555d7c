"""The lease store's hot-path SQL and :class:`Tx`, which sends it in as few round trips as each database allows.

On PostgreSQL the engine runs in autocommit mode and a write transaction is opened by hand: ``BEGIN`` travels
with the first batch and ``COMMIT`` with the last, so a grant costs two round trips (lock + read, then write +
commit + the durability flush, which runs after the lock is released) and a release one (a single statement with
data-modifying CTEs). The pool's lock is then held for one round trip plus the commit. Statements go to the
psycopg2 cursor directly (see :class:`Rows`). SQLite runs the same statements one by one inside ``BEGIN
IMMEDIATE`` (in-process calls, no round trips).

The PostgreSQL side keeps per-session state (prepared statements, ``synchronous_commit``), so it needs a direct
connection or a session-pooling proxy, not PgBouncer's transaction pooling.
"""

from __future__ import annotations

import functools
import re
from collections import namedtuple
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, CursorResult, Engine
from sqlalchemy.sql.elements import TextClause

LIVE = "('waiting', 'granted')"
LIVE_COLUMNS = ("id, pool, state, team, priority, seq, request, allocation, ttl_s, expires_at, created_at, "
                "preemptible, granted_at")
_PARAM = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")


@dataclass(frozen=True)
class Stmt:
    """A hot-path statement with ``:named`` parameters. On PostgreSQL each connection prepares it once
    (``PREPARE kiln_<name>``), so executing it skips parsing and planning, which cost more server CPU than
    running these one-row statements."""

    name: str
    sql: str
    lock: bool = False
    """A lock statement: skipped on SQLite, whose ``BEGIN IMMEDIATE`` already holds the one write lock."""

    @cached_property
    def params(self) -> tuple[str, ...]:
        """Parameter names in order of first use (``$1``, ``$2``, ... when prepared)."""
        return tuple(dict.fromkeys(_PARAM.findall(self.sql)))

    def prepare_sql(self) -> str:
        """``PREPARE kiln_<name> AS ...`` with ``$n`` placeholders."""
        index = {p: i + 1 for i, p in enumerate(self.params)}
        return f"PREPARE kiln_{self.name} AS " + _PARAM.sub(lambda m: f"${index[m.group(1)]}", self.sql)

    @cached_property
    def execute(self) -> str:
        """``EXECUTE kiln_<name>(:a, :b)``: the statement as sent on PostgreSQL."""
        return f"EXECUTE kiln_{self.name}({', '.join(':' + p for p in self.params)})"


# Pools and teams are locked with transaction-level advisory locks keyed by (class, hashtext(name)): a waiter
# queues in the lock manager and is handed the lock at the holder's commit, with no row version to chase. Locking
# the kiln_pools row instead (SELECT ... FOR UPDATE / UPDATE) measured ~35% fewer grants/s at 32 clients. A hash
# collision between two names only makes their grants take turns.
POOL_LOCK_CLASS, TEAM_LOCK_CLASS = 0x6B6C6E70, 0x6B6C6E74
LOCK_POOL = Stmt("lock_pool", f"SELECT pg_advisory_xact_lock({POOL_LOCK_CLASS}, hashtext(:pool))", lock=True)
LOCK_POOL_OF = Stmt("lock_pool_of", f"SELECT pg_advisory_xact_lock({POOL_LOCK_CLASS}, hashtext(pool)) "
                                    "FROM kiln_leases WHERE id = :id", lock=True)
LOCK_LEASE = Stmt("lock_lease", "SELECT id FROM kiln_leases WHERE id = :id FOR UPDATE", lock=True)
LOCK_TEAM = Stmt("lock_team", f"SELECT pg_advisory_xact_lock({TEAM_LOCK_CLASS}, hashtext(:team))", lock=True)
#: The arrival counter of a pool (queue order within a priority); taken under the pool's lock.
BUMP_POOL = Stmt("bump_pool", "UPDATE kiln_pools SET seq = seq + 1 WHERE name = :pool")
SELECT_LIVE = Stmt("select_live", f"SELECT {LIVE_COLUMNS} FROM kiln_leases WHERE pool = :pool AND state IN {LIVE}")
SELECT_LIVE_AND_OWN = Stmt("select_live_and_own", f"SELECT {LIVE_COLUMNS} FROM kiln_leases WHERE pool = (SELECT "
                                                  f"pool FROM kiln_leases WHERE id = :id) AND (state IN {LIVE} OR "
                                                  "id = :id)")
TEAM_USAGE = Stmt("team_usage", "SELECT COALESCE(SUM(gpus), 0), COALESCE(SUM(cpus), 0), COALESCE(SUM(memory), 0) "
                                "FROM kiln_leases WHERE team = :team AND state = 'granted'")
_LEASE_COLUMNS = ("id", "pool", "team", "priority", "state", "request", "allocation", "devices", "gpus", "cpus",
                  "memory", "dag_id", "run_id", "task_id", "try_number", "host", "pid", "ttl_s", "preemptible",
                  "created_at", "granted_at", "expires_at")
INSERT_LEASE = Stmt("insert_lease", f"INSERT INTO kiln_leases ({', '.join(_LEASE_COLUMNS)}, seq) VALUES "
                                    f"({', '.join(':' + c for c in _LEASE_COLUMNS)}, "
                                    "(SELECT seq FROM kiln_pools WHERE name = CAST(:pool AS VARCHAR)))")
GRANT_WAITING = Stmt("grant_waiting", "UPDATE kiln_leases SET state = 'granted', allocation = :allocation, "
                                      "devices = :devices, granted_at = :now, expires_at = :expires_at "
                                      "WHERE id = :id AND state = 'waiting'")
TOUCH_WAITING = Stmt("touch_waiting", "UPDATE kiln_leases SET expires_at = :expires_at WHERE id = :id AND "
                                      "state = 'waiting'")
INSERT_EVENT = Stmt("insert_event", "INSERT INTO kiln_lease_events (ts, lease_id, pool, event, devices, detail) "
                                    "VALUES (:now, :id, :pool, :event, :devices, :detail)")
#: PostgreSQL: all device rows of a grant from three parallel arrays (one prepared statement for any count).
INSERT_DEVICES_PG = Stmt("insert_devices", "INSERT INTO kiln_lease_devices (lease_id, pool, node, kind, device) "
                                           "SELECT :id, :pool, unnest(CAST(:nodes AS text[])), "
                                           "unnest(CAST(:kinds AS text[])), unnest(CAST(:device_ids AS text[]))")
HEARTBEAT = Stmt("heartbeat", "UPDATE kiln_leases SET expires_at = :now + ttl_s WHERE id = :id AND "
                              "state = 'granted'")
EXPIRE = Stmt("expire", f"UPDATE kiln_leases SET state = 'expired', ended_at = :now WHERE pool = :pool AND "
                        f"state IN {LIVE} AND expires_at < :now RETURNING id, pool, devices")
_END = ("UPDATE kiln_leases SET state = CASE WHEN state = 'granted' THEN 'released' ELSE 'cancelled' END, "
        f"ended_at = :now WHERE id = :id AND state IN {LIVE} RETURNING id, pool, state, devices")
_EVENT_OF_END = ("CASE WHEN state = 'released' THEN 'release' WHEN :reason = 'timeout' THEN 'timeout' "
                 "ELSE 'cancel' END")
#: PostgreSQL: end the lease, free its devices and audit it in one statement (one round trip in autocommit).
RELEASE_PG = Stmt("release", f"WITH l AS ({_END}), d AS (DELETE FROM kiln_lease_devices WHERE lease_id IN "
                             f"(SELECT id FROM l)) INSERT INTO kiln_lease_events (ts, lease_id, pool, event, "
                             f"devices, detail) SELECT CAST(:now AS double precision), id, pool, {_EVENT_OF_END}, "
                             "devices, :reason FROM l RETURNING event")
#: SQLite: the same in three statements (no data-modifying CTEs there), inside BEGIN IMMEDIATE.
END_LEASE = Stmt("end_lease", _END)
DELETE_DEVICES_OF = Stmt("delete_devices_of", "DELETE FROM kiln_lease_devices WHERE lease_id = :id")

PREPARED = (BUMP_POOL, LOCK_POOL, LOCK_POOL_OF, LOCK_LEASE, SELECT_LIVE, SELECT_LIVE_AND_OWN, LOCK_TEAM, TEAM_USAGE,
            INSERT_LEASE, GRANT_WAITING, TOUCH_WAITING, INSERT_EVENT, INSERT_DEVICES_PG, HEARTBEAT, EXPIRE,
            RELEASE_PG)


def prepare_all(dbapi_connection: Any) -> None:
    """Prepare the hot statements on a PostgreSQL connection in autocommit mode (once per connection)."""
    cursor = dbapi_connection.cursor()
    cursor.execute("; ".join(s.prepare_sql() for s in PREPARED))
    cursor.close()


_FLUSH = "BEGIN; SET LOCAL synchronous_commit = on; SELECT txid_current(); COMMIT"

_TEXT: dict[str, TextClause] = {}


def _text(sql: str) -> TextClause:
    # One TextClause per distinct statement: SQLAlchemy then reuses its compiled form without re-hashing the text.
    clause = _TEXT.get(sql)
    if clause is None:
        if len(_TEXT) > 512:
            _TEXT.clear()
        clause = _TEXT[sql] = text(sql)
    return clause


def insert_devices(count: int) -> str:
    """A multi-row insert of ``count`` device rows with parameters ``:n0, :k0, :d0, :n1, ...``."""
    rows = ", ".join(f"(:id, :pool, :n{i}, :k{i}, :d{i})" for i in range(count))
    return f"INSERT INTO kiln_lease_devices (lease_id, pool, node, kind, device) VALUES {rows}"


def insert_events(count: int) -> str:
    """A multi-row insert of ``count`` audit events with per-row ``:i{i}, :p{i}, :v{i}, :e{i}``."""
    rows = ", ".join(f"(:now, :i{i}, :p{i}, :e{i}, :v{i}, :detail)" for i in range(count))
    return f"INSERT INTO kiln_lease_events (ts, lease_id, pool, event, devices, detail) VALUES {rows}"


def delete_devices_of(count: int) -> str:
    """Delete the device rows of ``count`` leases ``:i0, :i1, ...``."""
    return f"DELETE FROM kiln_lease_devices WHERE lease_id IN ({', '.join(f':i{i}' for i in range(count))})"


@functools.lru_cache(maxsize=64)
def _row_type(names: tuple[str, ...]) -> Any:
    return namedtuple("Row", names, rename=True)  # type: ignore[misc]  # noqa: PYI024


@functools.lru_cache(maxsize=512)
def _pyformat(sql: str) -> str:
    """``:name`` parameters as psycopg2's ``%(name)s``."""
    return _PARAM.sub(lambda m: f"%({m.group(1)})s", sql.replace("%", "%%"))


class Rows:
    """What a statement sent on the DBAPI cursor returned: its rows (attributes by column name) and row count.

    The store's PostgreSQL statements skip SQLAlchemy's execution layer: compiling the parameters and building
    the result there cost more client CPU per statement than psycopg2's own work (~150 against ~60 us measured),
    and the clients' CPU is what bounded a pool's grant rate on a small machine."""

    def __init__(self, cursor: Any):
        self.rowcount: int = cursor.rowcount
        self._rows: list[Any] = []
        if cursor.description is not None:
            row = _row_type(tuple(d[0] for d in cursor.description))
            self._rows = [row._make(r) for r in cursor.fetchall()]

    def all(self) -> list[Any]:
        return self._rows

    def first(self) -> Any:
        return self._rows[0] if self._rows else None

    def one(self) -> Any:
        if len(self._rows) != 1:
            raise ValueError(f"expected one row, found {len(self._rows)}")
        return self._rows[0]

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None


class Tx:
    """A write transaction whose statements go out in batches.

    Batched (PostgreSQL, autocommit connection): each :meth:`run` is one round trip, its statements joined by
    ``;``, and only the last statement's rows come back; the first call sends ``BEGIN`` too and :meth:`commit`
    sends ``COMMIT`` with its statements. Unbatched (SQLite, inside an SQLAlchemy transaction): statements run one
    by one and the enclosing transaction commits. Lock statements are skipped on SQLite, whose ``BEGIN IMMEDIATE``
    already holds the one write lock.
    """

    def __init__(self, conn: Connection, *, batched: bool):
        self.conn = conn
        self.batched = batched
        self.open = False
        self.done = False
        self._cursor = conn.connection.dbapi_connection.cursor() if batched else None  # type: ignore[union-attr]

    def _send(self, sql: str, params: dict[str, Any] | None = None) -> Rows:
        assert self._cursor is not None
        self._cursor.execute(_pyformat(sql), params or {})
        return Rows(self._cursor)

    def run(self, statements: Sequence[Stmt | str], params: dict[str, Any]) -> CursorResult | Rows:
        """Execute ``statements`` in order; return the last one's result."""
        if not self.batched:
            result = None
            for st in statements:
                if isinstance(st, str):
                    result = self.conn.execute(_text(st), params)
                elif not st.lock:
                    result = self.conn.execute(_text(st.sql), params)
            assert result is not None, "a batch needs at least one statement that is not a lock"
            return result
        sql = "; ".join(st.execute if isinstance(st, Stmt) else st for st in statements)
        if not self.open:
            sql, self.open = "BEGIN; " + sql, True
        return self._send(sql, params)

    def once(self, statement: Stmt, params: dict[str, Any]) -> CursorResult | Rows:
        """Execute one statement as its own transaction (autocommit: one round trip) when nothing is open yet."""
        if self.batched and not self.open:
            self.done = True
            return self._send(statement.execute, params)
        return self.run([statement], params)

    def make_durable(self) -> None:
        """Wait until everything this session committed is on disk (PostgreSQL; SQLite commits are already).

        The store's PostgreSQL sessions commit asynchronously. A synchronous commit of a transaction that has an
        id flushes the WAL up to its own commit record, which lies after every earlier commit, so the grant
        just made survives a server crash before its holder ever hears of it.
        """
        if self.batched:
            self._send(_FLUSH)

    def commit(self, statements: Sequence[Stmt | str] = (), params: dict[str, Any] | None = None, *,
               durable: bool = False) -> None:
        """Execute ``statements`` and commit (in one round trip when batched).

        Args:
            durable: then also :meth:`make_durable`, in the same round trip on PostgreSQL: the server runs the
                flush after the COMMIT that released the locks, without waiting for the client in between.
        """
        self.done = True
        if not self.batched:
            if statements:
                self.run(statements, params or {})
            return
        if not self.open and not statements:
            if durable:
                self.make_durable()
            return
        sql = "; ".join([*(st.execute if isinstance(st, Stmt) else st for st in statements), "COMMIT"])
        self._send((sql if self.open else "BEGIN; " + sql) + ("; " + _FLUSH if durable else ""), params)
        self.open = False


@contextmanager
def transaction(engine: Engine, *, batched: bool) -> Iterator[Tx]:
    """A write transaction on ``engine``: SQLite's ``BEGIN IMMEDIATE`` (see ``tables``), or a batched PostgreSQL
    one that commits when the block ends and is rolled back (by dropping the connection) when it raises."""
    if not batched:
        with engine.begin() as conn:
            yield Tx(conn, batched=False)
        return
    with engine.connect() as conn:
        info = conn.connection.info
        if "kiln_prepared" not in info:  # once per connection; the tables exist by now
            prepare_all(conn.connection.dbapi_connection)
            info["kiln_prepared"] = True
        tx = Tx(conn, batched=True)
        try:
            yield tx
            if tx.open:
                tx.commit()
        except BaseException:
            if tx.open:  # closing the connection makes the server roll back and drop the pool lock
                conn.invalidate()
            raise
