"""The lease store's read side: records, the snapshot and the audit history (no locks taken)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.engine import Connection

from kiln.tasks.pools.allocation import format_size
from kiln.tasks.pools.inventory import Inventory
from kiln.tasks.pools.leases import LIVE_STATES, AuditEvent, LeaseNotFoundError, LeaseRecord, build_snapshot
from kiln.tasks.pools.tables import READ_ONLY, events, leases


class LeaseQueries:
    """Read-only queries of :class:`kiln.tasks.pools.store.LeaseStore` (a SQLite reader takes no write lock)."""

    url: str
    inventory: Inventory
    _engine: Engine
    _clock: Callable[[], float]

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            conn.execution_options(**{READ_ONLY: True})
            with conn.begin():
                yield conn

    def _state(self, lease_id: str) -> str | None:
        with self._read() as conn:
            return conn.execute(select(leases.c.state).where(leases.c.id == lease_id)).scalar()

    def lease(self, lease_id: str) -> LeaseRecord:
        """The stored record of ``lease_id``.

        Raises:
            LeaseNotFoundError: no such lease.
        """
        with self._read() as conn:
            row = conn.execute(select(leases).where(leases.c.id == lease_id)).one_or_none()
        if row is None:
            raise LeaseNotFoundError(f"no lease {lease_id!r} in {self.url}")
        return LeaseRecord.from_row(row)

    def leases(self, pool: str | None = None) -> list[LeaseRecord]:
        """Waiting and granted leases (of ``pool``, or all), in arrival order."""
        stmt = select(leases).where(leases.c.state.in_(LIVE_STATES)).order_by(leases.c.pool, leases.c.seq)
        if pool is not None:
            stmt = stmt.where(leases.c.pool == pool)
        with self._read() as conn:
            return [LeaseRecord.from_row(r) for r in conn.execute(stmt)]

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state: per pool its nodes' capacity and usage, the queue in grant order, active leases with
        owner and age; per team its quota and usage (see :func:`kiln.tasks.pools.leases.build_snapshot`)."""
        return build_snapshot(self.inventory, self.leases(), self._clock())

    def describe_usage(self, pool: str) -> str:
        """One line: each node's used/total devices and the queue length, for messages."""
        snap = self.snapshot()["pools"].get(pool)
        if snap is None:
            return f"pool {pool!r} is not in the inventory"
        nodes = "; ".join(f"{name} {n['gpus']['used']}/{n['gpus']['total']} GPUs, {n['cpus']['used']}/"
                          f"{n['cpus']['total']} CPUs, {format_size(n['memory']['used'])}/"
                          f"{format_size(n['memory']['total'])}" for name, n in snap["nodes"].items())
        return (f"pool {pool!r} now: {nodes}; {len(snap['leases'])} lease(s) held, {len(snap['waiting'])} "
                f"request(s) waiting")

    def history(self, pool: str | None = None, *, lease_id: str | None = None) -> list[AuditEvent]:
        """Audit events in id order (for one pool, the order its grants and releases took effect)."""
        stmt = select(events).order_by(events.c.id)
        if pool is not None:
            stmt = stmt.where(events.c.pool == pool)
        if lease_id is not None:
            stmt = stmt.where(events.c.lease_id == lease_id)
        with self._read() as conn:
            return [AuditEvent.from_row(r) for r in conn.execute(stmt)]
