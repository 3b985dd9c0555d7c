"""The lease store's tables and engine set-up, for SQLite (embedded default) and PostgreSQL.

Concurrency model: every grant happens in a transaction that first takes its pool's lock (on PostgreSQL a
transaction-level advisory lock keyed by the pool's name, see :mod:`kiln.tasks.pools.sql`; on SQLite ``BEGIN
IMMEDIATE`` takes the database's single write lock), so the grants of one pool are serialised and each sees the
previous one's devices. ``kiln_lease_devices`` has one
row per held GPU/CPU with a UNIQUE constraint, so even a buggy caller cannot make the database record a device
twice. Releases, heartbeats and expiries only ever free devices, so they need no pool lock (a grant that starts
after a release committed sees the devices free; one that started before still sees them held).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url

logger = logging.getLogger(__name__)

metadata = MetaData()
_LIVE = "state IN ('waiting', 'granted')"
_GRANTED = "state = 'granted'"

pools = Table(
    "kiln_pools", metadata,
    Column("name", String(64), primary_key=True),
    Column("seq", BigInteger, nullable=False, default=0),  # arrival counter of queued requests (FIFO)
)

teams = Table(
    "kiln_teams", metadata,  # the teams known to this database (their locks are advisory, like the pools')
    Column("name", String(64), primary_key=True),
)

leases = Table(
    "kiln_leases", metadata,
    Column("id", String(32), primary_key=True),
    Column("pool", String(64), nullable=False),
    Column("team", String(64), nullable=False),
    Column("priority", Integer, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("state", String(16), nullable=False),  # waiting | granted | released | expired | cancelled | revoked
    Column("request", Text, nullable=False),
    Column("allocation", Text),
    Column("devices", Text, nullable=False, server_default="{}"),  # the audit form of the allocation
    # Totals over all nodes, so a team's usage is one SUM.
    Column("gpus", Integer, nullable=False, default=0),
    Column("cpus", Integer, nullable=False, default=0),
    Column("memory", BigInteger, nullable=False, default=0),
    Column("dag_id", String(250), nullable=False, default=""),
    Column("run_id", String(250), nullable=False, default=""),
    Column("task_id", String(250), nullable=False, default=""),
    Column("try_number", Integer, nullable=False, default=0),
    Column("host", String(250), nullable=False, default=""),
    Column("pid", Integer, nullable=False, default=0),
    Column("ttl_s", Float, nullable=False),
    Column("preemptible", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
    Column("granted_at", Float),
    Column("expires_at", Float, nullable=False),
    Column("ended_at", Float),
    # Partial indexes over live leases only: the hot queries then cost the same however long the history grows
    # (ended leases stay in the table for lease() and history, but never in these indexes).
    Index("ix_kiln_leases_live", "pool", "expires_at", postgresql_where=text(_LIVE), sqlite_where=text(_LIVE)),
    Index("ix_kiln_leases_team_granted", "team", postgresql_where=text(_GRANTED), sqlite_where=text(_GRANTED)),
)

devices = Table(
    "kiln_lease_devices", metadata,
    Column("lease_id", String(32), nullable=False, index=True),
    Column("pool", String(64), nullable=False),
    Column("node", String(64), nullable=False),
    Column("kind", String(3), nullable=False),  # gpu | cpu
    Column("device", String(128), nullable=False),
    UniqueConstraint("pool", "node", "kind", "device", name="uq_kiln_lease_devices_device"),
)

preemptions = Table(
    "kiln_preemptions", metadata,  # one row per preempted lease: who took its devices and until when it may hold
    Column("lease_id", String(32), primary_key=True),
    Column("by_lease", String(32), nullable=False),
    Column("pool", String(64), nullable=False),
    Column("requested_at", Float, nullable=False),
    Column("deadline", Float, nullable=False),  # then the lease is revoked, whether or not its job has exited
    Index("ix_kiln_preemptions_pool", "pool"),
)

events = Table(
    "kiln_lease_events", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("lease_id", String(32), nullable=False),
    Column("pool", String(64), nullable=False),
    # request | grant | release | expire | cancel | timeout | preempt | revoke
    Column("event", String(16), nullable=False),
    Column("devices", Text, nullable=False, default="{}"),
    Column("detail", Text, nullable=False, default=""),
    Index("ix_kiln_lease_events_pool", "pool", "id"),
    Index("ix_kiln_lease_events_lease", "lease_id"),
)

#: Execution option that makes a SQLite transaction start DEFERRED (a reader) instead of IMMEDIATE.
READ_ONLY = "kiln_read_only"
_SQLITE_BUSY_S = 60.0
_PG_SCHEMA_LOCK = 0x6B696C6E  # pg_advisory_xact_lock key ("kiln"): one process creates the schema at a time


def make_engine(url: str) -> Engine:
    """An engine for ``url`` set up for the store: SQLite in WAL mode with ``BEGIN IMMEDIATE`` write
    transactions and a busy timeout; PostgreSQL with a small pool (each process holds one connection)."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database in (None, "", ":memory:"):
            raise ValueError(f"pools_db_url: the lease store needs a database file shared by all processes, "
                             f"found {url!r}; use sqlite:////path/to/pools.db")
        # The embedded default lives under KILN_HOME, which a first run may not have created yet.
        Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(u, connect_args={"timeout": _SQLITE_BUSY_S, "check_same_thread": False})
        _sqlite_transactions(engine)
        return engine
    if u.get_backend_name() != "postgresql":
        raise ValueError(f"pools_db_url: the lease store runs on SQLite or PostgreSQL, found {url!r}")
    # Autocommit: the store opens write transactions itself, so BEGIN and COMMIT ride along with its statements
    # (see kiln.tasks.pools.sql.Tx) instead of costing round trips of their own. Commits are asynchronous so that no
    # WAL fsync happens while a pool's lock is held; the store waits for durability (Tx.make_durable) before it
    # hands out a grant, outside the lock, where concurrent clients share one fsync.
    return create_engine(u, pool_size=2, max_overflow=4, pool_recycle=1800, isolation_level="AUTOCOMMIT",
                         connect_args={"options": "-c synchronous_commit=off"})


def _sqlite_transactions(engine: Engine) -> None:
    # pysqlite's own BEGIN is deferred and issued lazily, so two writers could both read the free devices before
    # either takes the write lock. Emitting BEGIN IMMEDIATE ourselves takes the lock first (SQLAlchemy's pysqlite
    # "serializable isolation / savepoints" recipe).
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(_SQLITE_BUSY_S * 1000)}")
        _wal_mode(cur)
        cur.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable against a process crash, not a power cut
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        mode = "DEFERRED" if conn.get_execution_options().get(READ_ONLY) else "IMMEDIATE"
        conn.exec_driver_sql(f"BEGIN {mode}")


def _wal_mode(cur: Any) -> None:
    # Switching a file to WAL takes the write lock, and SQLite answers this pragma "database is locked" at once when
    # another connection holds it, without calling the busy handler (many tasks open a new store together), so the
    # wait is ours, bounded like the busy timeout.
    deadline = time.monotonic() + _SQLITE_BUSY_S
    pause = 0.005
    while True:
        try:
            cur.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def insert_ignore(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert rows whose primary key may already exist (many processes start at once)."""
    if not rows:
        return
    dialect = conn.dialect.name
    stmt = (postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)).on_conflict_do_nothing()
    conn.execute(stmt, rows)


def create_schema(engine: Engine, pool_names: list[str], team_names: list[str]) -> None:
    """Create the tables and the pools' and teams' lock rows if missing; safe with many processes at once."""
    # A real transaction on PostgreSQL too, whose engine is otherwise in autocommit mode.
    options = {"isolation_level": "READ COMMITTED"} if engine.dialect.name == "postgresql" else {}
    with engine.connect() as conn, conn.execution_options(**options).begin():
        if set(metadata.tables) - set(inspect(conn).get_table_names()):
            if conn.dialect.name == "postgresql":
                # CREATE TABLE IF NOT EXISTS still races on PostgreSQL's catalog; serialise schema creation.
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_SCHEMA_LOCK})
            metadata.create_all(conn, checkfirst=True)
        insert_ignore(conn, pools, [{"name": p, "seq": 0} for p in pool_names])
        insert_ignore(conn, teams, [{"name": t} for t in team_names])
    logger.debug("lease store schema ready on %s", engine.url.render_as_string(hide_password=True))
