"""Preemption: a queued request that does not fit takes devices from preemptible leases, and a team's borrowed
capacity is reclaimed.

When a queued request heads its pool's queue but does not fit, its poll (:meth:`LeaseStore.try_grant`) looks for
preemptible leases it may take devices from: those of lower priority, and those of another team that holds more
than its quota (a preemptible request may borrow beyond it, see :func:`kiln.tasks.pools.placement.check_satisfiable`).
Victims are chosen by :func:`kiln.tasks.pools.placement.choose_victims` (lowest priority first, then the youngest,
and only when that makes the request fit) and recorded in ``kiln_preemptions`` with a deadline of their request's
``grace_s``, each with a ``preempt`` event in the audit history naming the lease that takes the devices.

The holders learn of it from their keep-alive (:class:`kiln.tasks.pools.keepalive.KeepAlive` polls
:meth:`preemption`): the job checkpoints and exits, the holder releases the lease and queues its request again. A
victim still holding its lease at the deadline is revoked by the preempting request's next poll: its devices are
freed with a ``revoke`` event, and its next heartbeat fails (:class:`LeaseLostError`), which stops its job.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import select, text

from kiln.tasks.pools.allocation import Allocation, LeaseRequest, Owner
from kiln.tasks.pools.inventory import Pool
from kiln.tasks.pools.leases import Preemption, devices_json
from kiln.tasks.pools.placement import Holder, choose_victims
from kiln.tasks.pools.sql import Tx
from kiln.tasks.pools.tables import preemptions

logger = logging.getLogger(__name__)

_PENDING = ("SELECT p.lease_id, p.by_lease, p.deadline FROM kiln_preemptions p JOIN kiln_leases l ON l.id = "
            "p.lease_id WHERE p.pool = :pool AND l.state = 'granted'")
_PREEMPTING_FOR = ("SELECT MAX(p.deadline) FROM kiln_preemptions p JOIN kiln_leases l ON l.id = p.lease_id WHERE "
                   "p.by_lease = :id AND l.state = 'granted'")
_OWNER = "SELECT dag_id, run_id, task_id, try_number, host, pid FROM kiln_leases WHERE id = :id"


_REVOKE = ("UPDATE kiln_leases SET state = 'revoked', ended_at = :now WHERE id = :id AND state = 'granted' "
           "RETURNING id, pool, devices")


def _insert_preemptions(count: int) -> str:
    rows = ", ".join(f"(:v{i}, :id, :pool, :now, :g{i})" for i in range(count))
    return f"INSERT INTO kiln_preemptions (lease_id, by_lease, pool, requested_at, deadline) VALUES {rows}"


def _preempt_events(count: int) -> str:
    rows = ", ".join(f"(:now, :v{i}, :pool, 'preempt', :d{i}, :x{i})" for i in range(count))
    return f"INSERT INTO kiln_lease_events (ts, lease_id, pool, event, devices, detail) VALUES {rows}"


def group_full(request: LeaseRequest, rows: Sequence[Any]) -> bool:
    """Whether ``request``'s group already holds its ``group_limit`` of the pool's granted ``rows`` (it must wait,
    and preempts nothing: the cap is the group's own choice, not a shortage)."""
    if request.group_limit is None:
        return False
    held = sum(1 for r in rows if r.state == "granted" and request.group in r.request
               and json.loads(r.request).get("group") == request.group)
    return held >= request.group_limit


class Preemptions:
    """The preemption side of :class:`kiln.tasks.pools.store.LeaseStore` (a mixin: it uses the store's engine,
    allocation cache, quota check and the helper that frees ended leases)."""

    _allocation: Callable[[Any], Allocation]
    _team_over: Callable[..., bool]
    _free: Callable[..., None]
    _read: Callable[..., Any]

    def preemption(self, lease_id: str) -> Preemption | None:
        """The preemption of ``lease_id``, if one was asked for (a holder's keep-alive polls this)."""
        with self._read() as conn:
            row = conn.execute(select(preemptions).where(preemptions.c.lease_id == lease_id)).one_or_none()
        return None if row is None else Preemption(lease_id=row.lease_id, by_lease=row.by_lease,
                                                   requested_at=row.requested_at, deadline=row.deadline)

    def preempting_for(self, lease_id: str) -> float | None:
        """The last deadline of the leases preempted for the queued ``lease_id`` that still hold their devices, or
        None when it waits for none (its grant then depends on others' releases, not on this preemption)."""
        with self._read() as conn:
            return conn.execute(text(_PREEMPTING_FOR), {"id": lease_id}).scalar()

    def _make_room(self, tx: Tx, pool: Pool, own: Any, request: LeaseRequest, rows: Sequence[Any],
                   now: float) -> bool:
        """Preempt for the queued entry ``own``, which heads its queue but does not fit; or revoke its victims
        whose grace period has passed.

        Returns:
            True when devices were freed (the caller decides again), False while the entry must wait.
        """
        if group_full(request, rows):
            return False
        pending = tx.run([_PENDING], {"pool": pool.name}).all()
        # Victims past their deadline lose their devices now (also those of a request that gave up meanwhile).
        overdue = [p for p in pending if p.deadline <= now]
        if overdue:
            self._revoke(tx, overdue, now)
            return True
        if any(p.by_lease == own.id for p in pending):
            return False  # its victims are checkpointing
        if not request.preemptible and self._team_over(tx, request.team, request, lock=False):
            return False  # a quota is not made room for
        targeted = {p.lease_id for p in pending}
        granted = {r.id: self._allocation(r) for r in rows if r.state == "granted"}
        over: dict[str, bool] = {}
        candidates = [Holder(r.id, granted[r.id], r.priority, r.granted_at or r.created_at) for r in rows
                      if r.state == "granted" and r.preemptible and r.id not in targeted
                      and self._may_take_from(tx, r, own.priority, request.team, over)]
        victims = choose_victims(pool, granted, candidates, request) if candidates else None
        if victims:
            self._record(tx, own, request, [r for r in rows if r.id in victims], now)
        return False

    def _may_take_from(self, tx: Tx, holder: Any, priority: int, team: str, over: dict[str, bool]) -> bool:
        """A preemptible lease gives way to a higher priority, and to another team while its own holds more than
        its quota (it borrowed). ``over`` caches each team's answer."""
        if holder.priority < priority:
            return True
        if holder.team == team:
            return False
        if holder.team not in over:
            over[holder.team] = self._team_over(tx, holder.team, LeaseRequest(pool=holder.pool), lock=False)
        return over[holder.team]

    def _record(self, tx: Tx, own: Any, request: LeaseRequest, victims: list[Any], now: float) -> None:
        o = tx.run([_OWNER], {"id": own.id}).one()
        taker = Owner(dag_id=o.dag_id, run_id=o.run_id, task_id=o.task_id, try_number=o.try_number, host=o.host,
                      pid=o.pid).label()
        params: dict[str, Any] = {"id": own.id, "pool": own.pool, "now": now}
        for i, v in enumerate(victims):
            grace = LeaseRequest.from_dict(json.loads(v.request)).grace_s
            params.update({f"v{i}": v.id, f"g{i}": now + grace, f"d{i}": devices_json(self._allocation(v)),
                           f"x{i}": f"preempted by lease {own.id} of {taker} (team {own.team!r}, priority "
                                    f"{own.priority}) for {request.describe()}; {grace:g} s to checkpoint and "
                                    "give the devices back"})
        tx.run([_insert_preemptions(len(victims)), _preempt_events(len(victims))], params)
        logger.warning("lease %s (priority %d) preempts %s to fit %s", own.id, own.priority,
                       ", ".join(f"{v.id} (priority {v.priority})" for v in victims), request.describe())

    def _revoke(self, tx: Tx, overdue: list[Any], now: float) -> None:
        """End the leases of ``overdue`` preemptions (rows of ``lease_id, by_lease``) and free their devices."""
        for p in overdue:  # one at a time: each event names its own preempting lease
            ended = tx.run([_REVOKE], {"now": now, "id": p.lease_id}).all()
            if ended:
                self._free(tx, ended, now, "revoke",
                           f"not given back within its grace period after preemption by lease {p.by_lease}")
                logger.warning("revoked lease %s: preempted by %s and not given back in time", p.lease_id,
                               p.by_lease)
