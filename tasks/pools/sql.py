"""The lease store's hot-path SQL and :class:`Tx`, which sends it in as few round trips as each database allows.

On PostgreSQL the engine runs in autocommit mode and a write transaction is opened by hand: ``BEGIN`` travels
with the first batch and ``COMMIT`` with the last, so a grant costs two round trips (lock + read, then write +
commit) and a release one (a single statement with data-modifying CTEs). The pool row's lock is then held for one
round trip plus the commit, which is what bounds a pool's grant rate. SQLite runs the same statements one by one
inside ``BEGIN IMMEDIATE`` (in-process calls, no round trips).

The PostgreSQL side keeps per-session state (prepared statements, ``synchronous_commit``), so it needs a direct
connection or a session-pooling proxy, not PgBouncer's transaction pooling.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, CursorResult, Engine
from sqlalchemy.sql.elements import TextClause

LIVE = "('waiting', 'granted')"
LIVE_COLUMNS = "id, pool, state, team, priority, seq, request, allocation, ttl_s, expires_at, created_at"
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
#: PostgreSQL fast path: the pool's live entries (no lock taken) from which the client places the request.
SELECT_POOL_STATE = Stmt("select_pool_state", "SELECT id, state, priority, allocation FROM kiln_leases WHERE "
                                              f"pool = :pool AND state IN {LIVE}")
_FAST_LEASE = ("id", "pool", "team", "request", "dag_id", "run_id", "task_id", "host")
_FAST_TYPED = (("priority", "integer"), ("gpus", "integer"), ("cpus", "integer"), ("memory", "bigint"),
               ("try_number", "integer"), ("pid", "integer"), ("ttl_s", "double precision"),
               ("preemptible", "boolean"), ("created_at", "double precision"), ("expires_at", "double precision"))
#: PostgreSQL fast path, run right after LOCK_POOL in the same implicit transaction: grant the first of the
#: client's alternative placements (``:a_alloc``/``:a_devs``, rows ``:d_*`` and memory rooms ``:m_*`` numbered
#: from 1) whose devices are all free and whose nodes' memory still fits, unless a waiter of equal or higher
#: priority is queued in the pool. Lease row, device rows and grant event are written together; it returns the
#: alternative granted, or no row (nothing written).
FAST_GRANT = Stmt("fast_grant", (
    "WITH alt_dev AS (SELECT * FROM unnest(CAST(:d_alt AS int[]), CAST(:d_node AS text[]), "
    "CAST(:d_kind AS text[]), CAST(:d_dev AS text[])) AS t(alt, node, kind, device)), "
    "alt_mem AS (SELECT * FROM unnest(CAST(:m_alt AS int[]), CAST(:m_node AS text[]), CAST(:m_room AS bigint[])) "
    "AS t(alt, node, room)), "
    "used AS MATERIALIZED (SELECT n.key AS node, SUM(CAST(n.value ->> 'memory' AS bigint)) AS memory "
    "FROM kiln_leases l, json_each(CAST(l.devices AS json)) n WHERE l.pool = :pool AND l.state = 'granted' "
    "GROUP BY n.key), "
    "pick AS (SELECT a.alt, a.alloc, a.devs FROM unnest(CAST(:a_alloc AS text[]), CAST(:a_devs AS text[])) "
    "WITH ORDINALITY AS a(alloc, devs, alt) "
    "WHERE NOT EXISTS (SELECT 1 FROM kiln_leases w WHERE w.pool = :pool AND w.state = 'waiting' "
    "AND w.priority >= CAST(:priority AS integer)) "
    "AND NOT EXISTS (SELECT 1 FROM alt_dev d JOIN kiln_lease_devices h ON h.pool = :pool AND h.node = d.node "
    "AND h.kind = d.kind AND h.device = d.device WHERE d.alt = a.alt) "
    "AND NOT EXISTS (SELECT 1 FROM alt_mem m JOIN used u ON u.node = m.node WHERE m.alt = a.alt "
    "AND u.memory > m.room) ORDER BY a.alt LIMIT 1), "
    f"lease AS (INSERT INTO kiln_leases ({', '.join(_FAST_LEASE)}, {', '.join(c for c, _ in _FAST_TYPED)}, "
    "state, allocation, devices, granted_at, seq) "
    f"SELECT {', '.join(':' + c for c in _FAST_LEASE)}, "
    f"{', '.join(f'CAST(:{c} AS {t})' for c, t in _FAST_TYPED)}, "
    "'granted', p.alloc, p.devs, CAST(:now AS double precision), "
    "(SELECT seq FROM kiln_pools WHERE name = :pool) FROM pick p RETURNING id, devices), "
    "dev AS (INSERT INTO kiln_lease_devices (lease_id, pool, node, kind, device) "
    "SELECT :id, :pool, d.node, d.kind, d.device FROM alt_dev d JOIN pick p ON d.alt = p.alt), "
    "event AS (INSERT INTO kiln_lease_events (ts, lease_id, pool, event, devices, detail) "
    "SELECT CAST(:now AS double precision), id, :pool, 'grant', devices, '' FROM lease) "
    "SELECT alt FROM pick"))
#: SQLite: the same in three statements (no data-modifying CTEs there), inside BEGIN IMMEDIATE.
END_LEASE = Stmt("end_lease", _END)
DELETE_DEVICES_OF = Stmt("delete_devices_of", "DELETE FROM kiln_lease_devices WHERE lease_id = :id")

PREPARED = (BUMP_POOL, LOCK_POOL, LOCK_POOL_OF, LOCK_LEASE, SELECT_LIVE, SELECT_LIVE_AND_OWN, LOCK_TEAM, TEAM_USAGE,
            INSERT_LEASE, GRANT_WAITING, TOUCH_WAITING, INSERT_EVENT, INSERT_DEVICES_PG, HEARTBEAT, EXPIRE,
            RELEASE_PG, SELECT_POOL_STATE, FAST_GRANT)


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

    def run(self, statements: Sequence[Stmt | str], params: dict[str, Any]) -> CursorResult:
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
        return self.conn.execute(_text(sql), params)

    def once(self, statement: Stmt, params: dict[str, Any]) -> CursorResult:
        """Execute one statement as its own transaction (autocommit: one round trip) when nothing is open yet."""
        if self.batched and not self.open:
            self.done = True
            return self.conn.execute(_text(statement.execute), params)
        return self.run([statement], params)

    def atomic(self, statements: Sequence[Stmt], params: dict[str, Any]) -> CursorResult:
        """PostgreSQL, nothing open: ``statements`` in one round trip as one implicit transaction, committed when
        the last one ends (a multi-statement query in autocommit). Each statement reads a fresh snapshot, so one
        that follows a lock statement sees every commit made before the lock was granted. Returns the last one's
        result."""
        assert self.batched and not self.open, "atomic() needs a PostgreSQL connection with no transaction open"
        return self.conn.execute(_text("; ".join(st.execute for st in statements)), params)

    def make_durable(self) -> None:
        """Wait until everything this session committed is on disk (PostgreSQL; SQLite commits are already).

        The store's PostgreSQL sessions commit asynchronously. A synchronous commit of a transaction that has an
        id flushes the WAL up to its own commit record, which lies after every earlier commit, so the grant
        just made survives a server crash before its holder ever hears of it.
        """
        if self.batched:
            self.conn.execute(_text(_FLUSH))

    def commit(self, statements: Sequence[Stmt | str] = (), params: dict[str, Any] | None = None) -> None:
        """Execute ``statements`` and commit (in one round trip when batched)."""
        self.done = True
        if not self.batched:
            if statements:
                self.run(statements, params or {})
            return
        if not self.open and not statements:
            return
        sql = "; ".join([*(st.execute if isinstance(st, Stmt) else st for st in statements), "COMMIT"])
        self.conn.execute(_text(sql if self.open else "BEGIN; " + sql), params or {})
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
