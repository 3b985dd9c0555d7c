"""One writer per champion: a lock per model, held by one pipeline run from ``deploy`` through ``verify`` to
``promote``, and by a champion move outside a run (rollback, approval) for its duration.

Why a row with an expiry and not an OS-level or session lock: the three steps are three Airflow tasks, so three
processes, possibly on three Celery workers. A lock that dies with its process (``fcntl``, a PostgreSQL session
advisory lock) would be gone between them, and another run could deploy in the gap. So the lock is a row in the
lease store's database (``KILN_POOLS_DB_URL``: a SQLite file on the embedded profile, PostgreSQL on prod; the same
statements on both), keyed by model, held by a run key with a token and an expiry:

- ``deploy`` acquires it, waiting while another run holds it, and records the token in its report;
- ``verify`` and ``promote`` renew it with that token before they act (and keep renewing it while they work): a
  run whose lock expired and was taken over is fenced out instead of writing over the new holder;
- ``promote`` releases it, and so do ``verify``'s rollback and a candidate that the re-gate rejects;
- a run killed or abandoned between the steps holds it until ``expires_at``; the next acquirer then takes it
  over (logged). A retry of the same run's step gets the lock back at once: it is re-entrant by holder.

The expiry is the only way a killed holder lets go, so it is bounded (:data:`LOCK_TTL_S`), and a step that works
longer (a canary watched for minutes) renews it from a thread (:meth:`ChampionLocks.kept`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Column, Float, MetaData, String, Table, delete, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

#: How long a holder keeps the lock without renewing it: the gap between two Airflow tasks of a run, with room
#: for a busy scheduler. A killed run blocks the model's next deploy for at most this long.
LOCK_TTL_S = 600.0
#: How long ``deploy`` waits for another run's deploy → verify → promote (a canary window is 300 s by default).
DEPLOY_WAIT_S = 1800.0
#: How long a rollback or approval waits for a run in flight.
MOVE_WAIT_S = 300.0

_metadata = MetaData()
champion_locks = Table(
    "kiln_champion_locks", _metadata,
    Column("model", String(256), primary_key=True),
    Column("holder", String(512), nullable=False),
    Column("token", String(32), nullable=False),
    Column("acquired_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)
_PG_SCHEMA_LOCK = 0x6B6C6368  # pg_advisory_xact_lock key: one process creates the table at a time


class ChampionLockError(RuntimeError):
    """The champion lock of a model could not be had in time; the message names its holder."""


class ChampionLockLostError(ChampionLockError):
    """A run no longer holds the lock it took (it expired and another writer took it): it must not write."""


@dataclass(frozen=True)
class LockGrant:
    """The lock of one model, as its holder got it."""

    model: str
    holder: str
    token: str
    expires_at: float
    waited_s: float = 0.0
    """How long the acquirer waited for it (0 when it was free or already its own)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (kept in ``deploy``'s report, where ``verify`` and ``promote`` read the token)."""
        return asdict(self)


class ChampionLocks:
    """The champion locks in the lease store's database (a stateless client but for its engine)."""

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time):
        from kiln.tasks.pools.tables import make_engine

        self.engine: Engine = make_engine(url)
        self.clock = clock
        _create_table(self.engine)

    @classmethod
    def from_settings(cls) -> ChampionLocks:
        """The locks in the database ``KILN_POOLS_DB_URL`` names (the lease store's)."""
        from kiln.tasks.settings import get_settings

        return cls(get_settings().pools_db_url)

    def close(self) -> None:
        """Close the database connections."""
        self.engine.dispose()

    def try_acquire(self, model: str, holder: str, *, ttl_s: float = LOCK_TTL_S) -> LockGrant | None:
        """The lock of ``model`` if it is free, expired or already ``holder``'s (a new token then); else ``None``.

        One statement (an upsert whose update applies only to a free row), so two acquirers never both win.
        """
        now = self.clock()
        token, expires_at = uuid.uuid4().hex, now + ttl_s
        values: dict[str, Any] = {"model": model, "holder": holder, "token": token, "acquired_at": now,
                                  "expires_at": expires_at}
        insert = (postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert)(champion_locks)
        taken = insert.values(**values).on_conflict_do_update(
            index_elements=[champion_locks.c.model],
            set_={k: insert.excluded[k] for k in ("holder", "token", "acquired_at", "expires_at")},
            where=(champion_locks.c.expires_at < now) | (champion_locks.c.holder == holder),
        )
        before = self.holder(model)
        with self.engine.begin() as conn:
            got = conn.execute(taken.returning(champion_locks.c.token)).first()
        if got is None:
            return None
        # Only a lock that had expired was taken over; a live one we saw was released before our upsert.
        if before is not None and before["holder"] != holder and before["expires_at"] < now:
            log.warning("took over the champion lock of %s from %s: it expired %.0f s ago without a release",
                        model, before["holder"], now - before["expires_at"])
        return LockGrant(model, holder, token, expires_at)

    def acquire(self, model: str, holder: str, *, ttl_s: float = LOCK_TTL_S, timeout_s: float = DEPLOY_WAIT_S,
                poll_s: float = 0.25) -> LockGrant:
        """The lock of ``model`` for ``holder``, waiting up to ``timeout_s`` while another holder has it.

        Raises:
            ChampionLockError: still held by another after ``timeout_s`` (the message names it and since when).
        """
        t0 = time.monotonic()
        logged = False
        while True:
            grant = self.try_acquire(model, holder, ttl_s=ttl_s)
            waited = time.monotonic() - t0
            if grant is not None:
                if logged:
                    log.info("got the champion lock of %s after %.1f s", model, waited)
                return LockGrant(**{**grant.to_dict(), "waited_s": round(waited, 3)})
            other = self.holder(model)
            if waited >= timeout_s:
                who = (f"{other['holder']} (since {time.strftime('%H:%M:%S', time.gmtime(other['acquired_at']))} "
                       f"UTC, expiring in {other['expires_at'] - self.clock():.0f} s)") if other else "another writer"
                raise ChampionLockError(
                    f"the champion of {model} is being changed by {who}; waited {waited:.0f} s. Retry when it is "
                    "done; a run that was killed lets go when its lock expires")
            if not logged and other is not None:
                log.info("waiting for the champion lock of %s, held by %s", model, other["holder"])
                logged = True
            time.sleep(poll_s)

    def renew(self, model: str, holder: str, token: str, *, ttl_s: float = LOCK_TTL_S) -> None:
        """Extend the holder's lock (the fence: every write under the lock starts with this).

        Raises:
            ChampionLockLostError: the lock is no longer this token's (it expired and another writer took it).
        """
        now = self.clock()
        with self.engine.begin() as conn:
            done = conn.execute(update(champion_locks).where(
                champion_locks.c.model == model, champion_locks.c.token == token).values(expires_at=now + ttl_s))
        if done.rowcount != 1:
            other = self.holder(model)
            raise ChampionLockLostError(
                f"{holder} no longer holds the champion lock of {model} (now "
                f"{'held by ' + other['holder'] if other else 'free'}): it expired before this step ran, and the "
                "champion may have changed since; rerun the pipeline")

    def release(self, model: str, token: str) -> bool:
        """Let go of the lock; ``False`` if this token did not hold it (already released or taken over)."""
        with self.engine.begin() as conn:
            done = conn.execute(delete(champion_locks).where(champion_locks.c.model == model,
                                                             champion_locks.c.token == token))
        return done.rowcount == 1

    def holder(self, model: str) -> dict[str, Any] | None:
        """The row of ``model``'s lock (``holder``, ``token``, ``acquired_at``, ``expires_at``), or ``None``."""
        from kiln.tasks.pools.tables import READ_ONLY

        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            row = conn.execute(select(champion_locks).where(champion_locks.c.model == model)).first()
        return dict(row._mapping) if row is not None else None

    @contextmanager
    def kept(self, grant: LockGrant, *, ttl_s: float = LOCK_TTL_S) -> Iterator[LockGrant]:
        """Renew ``grant`` now (fenced) and every ``ttl_s / 4`` while the block runs.

        Raises:
            ChampionLockLostError: the lock was lost before the block started.
        """
        self.renew(grant.model, grant.holder, grant.token, ttl_s=ttl_s)
        stop = threading.Event()

        def keep() -> None:
            while not stop.wait(ttl_s / 4):
                try:
                    self.renew(grant.model, grant.holder, grant.token, ttl_s=ttl_s)
                except Exception as exc:  # noqa: BLE001 (the step's own next renew or release reports it)
                    log.warning("could not renew the champion lock of %s: %s", grant.model, exc)

        thread = threading.Thread(target=keep, name=f"champion-lock-{grant.model}", daemon=True)
        thread.start()
        try:
            yield grant
        finally:
            stop.set()
            thread.join(timeout=5)

    @contextmanager
    def held(self, model: str, holder: str, *, timeout_s: float = MOVE_WAIT_S) -> Iterator[LockGrant]:
        """Hold the lock of ``model`` for one block (a move outside a run), released on every way out."""
        grant = self.acquire(model, holder, timeout_s=timeout_s)
        try:
            with self.kept(grant):
                yield grant
        finally:
            self.release(model, grant.token)


def grant_from(data: dict[str, Any] | None) -> LockGrant | None:
    """A grant recorded with :meth:`LockGrant.to_dict` (``None`` stays ``None``)."""
    return LockGrant(**data) if data else None


def _create_table(engine: Engine) -> None:
    options = {"isolation_level": "READ COMMITTED"} if engine.dialect.name == "postgresql" else {}
    with engine.connect() as conn, conn.execution_options(**options).begin():
        if conn.dialect.name == "postgresql":
            # CREATE TABLE IF NOT EXISTS still races on PostgreSQL's catalog; serialise it.
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_SCHEMA_LOCK})
        _metadata.create_all(conn, checkfirst=True)
