"""The lease store: all-or-nothing grants of pool devices, a FIFO-within-priority queue, TTLs and an audit trail.

Every process (Airflow workers, the triggerer, CLIs, tests) opens its own :class:`LeaseStore` on the same database;
the database is the only coordinator, so no daemon is needed. See :mod:`kiln.tasks.pools.tables` for how grants are
serialised. A lease lives ``ttl_s`` seconds past its last heartbeat (:mod:`~kiln.tasks.pools.keepalive` sends
them); an expired lease's devices are reclaimed by the next grant in its pool that would not fit otherwise, or by
``reap()``.

Typical in-process use::

    store = LeaseStore.from_settings()
    with hold(store, LeaseRequest(pool="a100", gpus=2, memory=parse_size("32GiB")), Owner(host="me", pid=1),
              timeout_s=600) as allocation:
        run_job(allocation.master.cuda_visible_devices())
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from kiln.tasks.pools import sql
from kiln.tasks.pools.allocation import (
    Allocation,
    LeaseLostError,
    LeaseRequest,
    NodeAllocation,
    Owner,
    PoolTimeoutError,
)
from kiln.tasks.pools.expiry import Expiry
from kiln.tasks.pools.inventory import Inventory, Pool
from kiln.tasks.pools.leases import (
    LIVE_STATES,
    allocation_json,
    devices_json,
)
from kiln.tasks.pools.placement import UsageTracker, check_satisfiable, place
from kiln.tasks.pools.preemption import Preemptions, group_full
from kiln.tasks.pools.queries import LeaseQueries
from kiln.tasks.pools.sql import Tx
from kiln.tasks.pools.tables import create_schema, make_engine

logger = logging.getLogger(__name__)

_CACHE_MAX = 4096


class LeaseStore(LeaseQueries, Expiry, Preemptions):
    """Leases on the pools of ``inventory``, kept in the database at ``url`` (SQLite or PostgreSQL).

    Args:
        url: SQLAlchemy URL, e.g. ``sqlite:////var/kiln/pools.db`` or ``postgresql+psycopg2://u:pw@host/db``.
        inventory: the pools and teams; every process using one database must load the same inventory.
        clock: seconds since the epoch; tests inject a fake one to expire leases without waiting.
    """

    def __init__(self, url: str, inventory: Inventory, *, clock: Callable[[], float] = time.time):
        self.url = url
        self.inventory = inventory
        self._clock = clock
        self._engine = make_engine(url)
        self._batched = self._engine.dialect.name == "postgresql"
        create_schema(self._engine, sorted(inventory.pools), sorted(inventory.teams))
        self._next_sweep = 0.0
        self._valid: set[LeaseRequest] = set()
        self._allocations: dict[str, Allocation] = {}  # granted allocations never change: parse each once
        self._usage: dict[str, UsageTracker] = {}

    @classmethod
    def from_settings(cls) -> LeaseStore:
        """The store at ``KILN_POOLS_DB_URL`` over the inventory at ``KILN_POOLS_FILE`` (or this machine)."""
        from kiln.tasks.settings import get_settings

        return cls(get_settings().pools_db_url, Inventory.from_settings())

    def close(self) -> None:
        """Close the database connections of this process."""
        self._engine.dispose()

    def __enter__(self) -> LeaseStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transactions -------------------------------------------------------------------------------------

    def _tx(self) -> AbstractContextManager[Tx]:
        return sql.transaction(self._engine, batched=self._batched)

    # --- the grant decision -------------------------------------------------------------------------------

    def _priority(self, request: LeaseRequest) -> int:
        return request.priority if request.priority is not None else self.inventory.teams[request.team].priority

    def _allocation(self, row: Any) -> Allocation:
        allocation = self._allocations.get(row.id)
        if allocation is None:
            if len(self._allocations) >= _CACHE_MAX:
                self._allocations.clear()
            allocation = self._allocations[row.id] = Allocation.from_json(row.allocation)
        return allocation

    def _team_over(self, tx: Tx, team_name: str, request: LeaseRequest, *, lock: bool) -> bool:
        """Whether granting ``request`` would take ``team_name`` over its quota (False when it has none)."""
        team = self.inventory.teams.get(team_name)
        quota = (team.quota_gpus, team.quota_cpus, team.quota_memory) if team else (None, None, None)
        if quota == (None, None, None):
            return False
        # Quotas span pools, whose grants run in parallel on PostgreSQL: the team's lock serialises them.
        used = tx.run([sql.LOCK_TEAM, sql.TEAM_USAGE] if lock else [sql.TEAM_USAGE], {"team": team_name}).one()
        asked = (request.gpus * request.nodes, request.cpus * request.nodes, request.memory * request.nodes)
        return any(q is not None and u + a > q for u, a, q in zip(used, asked, quota, strict=True))

    def _decide(self, tx: Tx, pool: Pool, request: LeaseRequest, priority: int, seq: int | None,
                lease_id: str | None, rows: Sequence[Any]) -> tuple[NodeAllocation, ...] | None:
        """The devices to grant now, or None: a waiter is ahead in the queue, it does not fit, or over quota.

        A waiter ahead (higher priority, or equal and earlier) blocks the request, unless that waiter is itself
        held back only by its own team's quota and belongs to another team: one team at its ceiling must not
        stall the pool for everyone.
        """
        if self._waiter_ahead(tx, request, priority, seq, lease_id, rows) or group_full(request, rows):
            return None
        granted = {r.id: self._allocation(r) for r in rows if r.state == "granted"}
        nodes = place(pool, self._usage.setdefault(pool.name, UsageTracker()).update(granted), request)
        # A preemptible request may borrow beyond its team's quota (and is then preempted first by other teams).
        if nodes is None or (not request.preemptible and self._team_over(tx, request.team, request, lock=True)):
            return None
        return nodes

    def _waiter_ahead(self, tx: Tx, request: LeaseRequest, priority: int, seq: int | None, lease_id: str | None,
                      rows: Sequence[Any]) -> bool:
        """Whether a waiter ahead in the queue (higher priority, or equal and earlier) blocks the request: one held
        back by its group's cap does not, nor one of another team held back by its team's quota."""
        for r in rows:
            if r.state == "waiting" and r.id != lease_id and (r.priority > priority or (
                    r.priority == priority and (seq is None or r.seq < seq))):
                waiter = LeaseRequest.from_dict(json.loads(r.request))
                if group_full(waiter, rows):
                    continue
                if r.team == request.team or not self._team_over(tx, r.team, waiter, lock=False):
                    return True
        return False

    def _decide_or_reap(self, tx: Tx, pool: Pool, request: LeaseRequest, priority: int, seq: int | None,
                        lease_id: str | None, rows: Sequence[Any], now: float,
                        reread: tuple[sql.Stmt, dict[str, Any]]) -> tuple[NodeAllocation, ...] | None:
        # Expired leases only matter when something does not fit, so the reap runs on that path alone.
        nodes = self._decide(tx, pool, request, priority, seq, lease_id, rows)
        if nodes is None and self._reap(tx, now, pool.name):
            rows = tx.run([reread[0]], reread[1]).all()
            nodes = self._decide(tx, pool, request, priority, seq, lease_id, rows)
        return nodes

    def _grant_statements(self, tx: Tx, allocation: Allocation, params: dict[str, Any]) -> list[sql.Stmt | str]:
        """Statements (their parameters added to ``params``) recording the devices and the grant event."""
        devices = [(n.node, kind, str(d)) for n in allocation.nodes
                   for kind, ids in (("gpu", n.gpus), ("cpu", n.cpus)) for d in ids]
        params.update(event="grant", detail="")
        if not devices:
            return [sql.INSERT_EVENT]
        # The UNIQUE constraint on the device rows makes the database refuse a device held twice.
        if tx.batched:
            params.update(nodes=[d[0] for d in devices], kinds=[d[1] for d in devices],
                          device_ids=[d[2] for d in devices])
            return [sql.INSERT_DEVICES_PG, sql.INSERT_EVENT]
        for i, (node, kind, device) in enumerate(devices):
            params.update({f"n{i}": node, f"k{i}": kind, f"d{i}": device})
        return [sql.insert_devices(len(devices)), sql.INSERT_EVENT]

    def _lease_params(self, lease_id: str, request: LeaseRequest, owner: Owner) -> dict[str, Any]:
        """The new lease row's values, less the time and the allocation (prepared before the pool is locked)."""
        return {"id": lease_id, "pool": request.pool, "team": request.team, "priority": self._priority(request),
                "state": "waiting", "request": json.dumps(request.to_dict()), "allocation": None,
                "devices": "{}", "gpus": request.gpus * request.nodes, "cpus": request.cpus * request.nodes,
                "memory": request.memory * request.nodes, "dag_id": owner.dag_id, "run_id": owner.run_id,
                "task_id": owner.task_id, "try_number": owner.try_number, "host": owner.host, "pid": owner.pid,
                "ttl_s": request.ttl_s, "preemptible": request.preemptible, "granted_at": None}

    @staticmethod
    def _stamp(values: dict[str, Any], now: float, allocation: Allocation | None = None) -> dict[str, Any]:
        values.update(now=now, created_at=now, expires_at=now + values["ttl_s"])
        if allocation is not None:
            values.update(state="granted", allocation=allocation_json(allocation), devices=devices_json(allocation),
                          granted_at=now)
        return values

    # --- public API ---------------------------------------------------------------------------------------

    def validate(self, request: LeaseRequest) -> None:
        """Raise :class:`UnsatisfiableRequestError` if ``request`` could never be granted (see
        :func:`kiln.tasks.pools.placement.check_satisfiable`)."""
        if request not in self._valid:
            check_satisfiable(self.inventory, request)
            if len(self._valid) >= _CACHE_MAX:
                self._valid.clear()
            self._valid.add(request)

    def try_acquire(self, request: LeaseRequest, owner: Owner) -> Allocation | None:
        """Grant ``request`` now if it fits and no one of higher or equal priority waits before it in its pool.

        Returns:
            The allocation, or None (nothing is left behind: no queue entry).

        Raises:
            UnsatisfiableRequestError: it could never fit.
        """
        self.validate(request)
        pool, lease_id, params = self.inventory.pools[request.pool], uuid.uuid4().hex, {"pool": request.pool}
        values = self._lease_params(lease_id, request, owner)
        with self._tx() as tx:
            now = self._clock()
            rows = tx.run([sql.LOCK_POOL, sql.SELECT_LIVE], params).all()
            nodes = self._decide_or_reap(tx, pool, request, self._priority(request), None, None, rows, now,
                                         (sql.SELECT_LIVE, params))
            if nodes is None:
                tx.commit()
                allocation = None
            else:
                allocation = Allocation(lease_id=lease_id, pool=pool.name, nodes=nodes, ttl_s=request.ttl_s)
                self._stamp(values, now, allocation)
                # Durable in the same round trip, after the COMMIT that released the pool lock: concurrent
                # clients share the fsync.
                tx.commit([sql.INSERT_LEASE, *self._grant_statements(tx, allocation, values)], values, durable=True)
        if allocation is None:
            self._sweep_if_due()
            return None
        logger.info("granted lease %s to %s: %s", lease_id, owner.label(), request.describe())
        return allocation

    def enqueue(self, request: LeaseRequest, owner: Owner) -> str:
        """Queue ``request`` (state ``waiting``) and return its lease id; poll :meth:`try_grant` with it at least
        every ``ttl_s / 3`` seconds, or the entry expires.

        Raises:
            UnsatisfiableRequestError: it could never fit (nothing is queued).
        """
        self.validate(request)
        lease_id = uuid.uuid4().hex
        with self._tx() as tx:
            values = self._stamp(self._lease_params(lease_id, request, owner), self._clock())
            values.update(event="request", detail=f"{request.describe()} for {owner.label()}")
            tx.commit([sql.LOCK_POOL, sql.BUMP_POOL, sql.INSERT_LEASE, sql.INSERT_EVENT], values, durable=True)
        logger.info("queued lease %s for %s: %s", lease_id, owner.label(), request.describe())
        return lease_id

    def try_grant(self, lease_id: str) -> Allocation | None:
        """Grant the queued entry ``lease_id`` if it heads its pool's queue and fits; heartbeat it either way.

        Returns:
            The allocation (also when it was granted before), or None while it must keep waiting.

        Raises:
            LeaseLostError: the entry was cancelled, expired or released, or never existed.
        """
        lost = allocation = None
        with self._tx() as tx:
            now = self._clock()
            # The entry's own row is locked too: a concurrent cancel waits until this grant decision commits.
            rows = tx.run([sql.LOCK_POOL_OF, sql.LOCK_LEASE, sql.SELECT_LIVE_AND_OWN], {"id": lease_id}).all()
            own = next((r for r in rows if r.id == lease_id), None)
            if own is None or own.state not in LIVE_STATES:
                lost = own.state if own else "unknown"
            elif own.state == "granted":
                allocation = self._allocation(own)
            elif own.expires_at < now:  # its poller stalled past the ttl: others may have moved up meanwhile
                self._reap(tx, now, own.pool)
                lost = "expired"
            else:
                allocation = self._grant_waiting(tx, own, rows, now)
            tx.commit()
            if allocation is not None:
                tx.make_durable()
        if lost is not None:
            raise LeaseLostError(f"queued lease {lease_id} is {lost}: it was cancelled, or not polled within its "
                                 "ttl")
        if allocation is None:
            self._sweep_if_due()
        return allocation

    def _grant_waiting(self, tx: Tx, own: Any, rows: Sequence[Any], now: float) -> Allocation | None:
        request = LeaseRequest.from_dict(json.loads(own.request))
        values: dict[str, Any] = {"id": own.id, "pool": own.pool, "now": now, "expires_at": now + own.ttl_s}
        pool, reread = self.inventory.pools[own.pool], (sql.SELECT_LIVE_AND_OWN, {"id": own.id})
        nodes = self._decide_or_reap(tx, pool, request, own.priority, own.seq, own.id, rows, now, reread)
        if nodes is None and not self._waiter_ahead(tx, request, own.priority, own.seq, own.id, rows):
            # The rows again: the decision above may have reaped expired leases.
            rows = tx.run([reread[0]], reread[1]).all()
            if self._make_room(tx, pool, own, request, rows, now):
                rows = tx.run([reread[0]], reread[1]).all()
                nodes = self._decide(tx, pool, request, own.priority, own.seq, own.id, rows)
        if nodes is None:
            tx.commit([sql.TOUCH_WAITING], values)
            return None
        allocation = Allocation(lease_id=own.id, pool=own.pool, nodes=nodes, ttl_s=own.ttl_s)
        values.update(allocation=allocation_json(allocation), devices=devices_json(allocation))
        tx.commit([sql.GRANT_WAITING, *self._grant_statements(tx, allocation, values)], values)
        logger.info("granted queued lease %s after %.1fs: %s", own.id, now - own.created_at, request.describe())
        return allocation

    def acquire(self, request: LeaseRequest, owner: Owner, *, timeout_s: float, poll_s: float = 0.5) -> Allocation:
        """Block until ``request`` is granted (queueing it if it does not fit now) or ``timeout_s`` passes.

        Raises:
            UnsatisfiableRequestError: it could never fit.
            PoolTimeoutError: not granted in time; the queue entry is cancelled and the message names the request
                and the pool's usage.
        """
        allocation = self.try_acquire(request, owner)
        if allocation is not None:
            return allocation
        lease_id = self.enqueue(request, owner)
        deadline = time.monotonic() + timeout_s
        poll_s = min(poll_s, request.ttl_s / 3)
        try:
            while True:
                allocation = self.try_grant(lease_id)
                if allocation is not None:
                    return allocation
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(poll_s, left))
        except BaseException:  # interrupted or failed: leave no queue entry (or lease) behind
            self.release(lease_id, reason="cancelled")
            raise
        usage = self.describe_usage(request.pool)
        self.release(lease_id, reason="timeout")
        raise PoolTimeoutError(f"no grant within {timeout_s:g}s for {request.describe()} (team {request.team!r}); "
                               f"{usage}")

    def heartbeat(self, lease_id: str) -> None:
        """Push the granted lease's expiry ``ttl_s`` past now.

        Raises:
            LeaseLostError: the lease is no longer granted (expired, released), so its devices may be someone
                else's.
        """
        with self._tx() as tx:
            changed = tx.once(sql.HEARTBEAT, {"id": lease_id, "now": self._clock()}).rowcount
        if changed != 1:
            raise LeaseLostError(f"lease {lease_id} is {self._state(lease_id) or 'unknown'}, no longer granted: its "
                                 "devices may belong to another job now")

    def release(self, lease_id: str, reason: str = "released") -> bool:
        """End a granted lease (freeing its devices) or cancel a queued one. Idempotent.

        Args:
            reason: recorded in the audit history; ``timeout`` records a ``timeout`` event for a queued entry.

        Returns:
            True if this call changed something; False if it had already ended or does not exist.
        """
        params = {"id": lease_id, "now": self._clock(), "reason": reason}
        with self._tx() as tx:
            if tx.batched:
                event = tx.once(sql.RELEASE_PG, params).scalar()
            else:
                row = tx.run([sql.END_LEASE], params).first()
                event = None if row is None else (
                    "release" if row.state == "released" else "timeout" if reason == "timeout" else "cancel")
                if row is not None:
                    params.update(pool=row.pool, event=event, devices=row.devices, detail=reason)
                    tx.run([sql.DELETE_DEVICES_OF, sql.INSERT_EVENT], params)
        if event is None:
            return False
        logger.info("%s lease %s (%s)", event, lease_id, reason)
        return True
