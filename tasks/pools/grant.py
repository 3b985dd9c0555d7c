"""The lease store's grant decisions, and the short grant path that most requests take on PostgreSQL.

Every grant of a pool is decided under the pool's lock (see :mod:`kiln.tasks.pools.tables`). On the locked path
(:meth:`Granting._decide`), the client takes the lock and reads the pool's live leases in one round trip, decides
in Python (queue order, quotas, placement, reaping expired leases when nothing fits) and writes and commits in a
second: the lock is held across a round trip and the client's own work. With 32 clients on PostgreSQL that hold
measured ~2 ms per grant (1.9 ms for the write round trip alone, the client waiting for a CPU to come back to),
which capped a pool at ~500 grants/s and put every other request in line behind it.

The fast path (:meth:`Granting._try_fast`, PostgreSQL only) takes the lock for server work alone. The client reads
the pool's live leases without any lock, places the request in Python on that view, and also the next few
placements it would make if the earlier ones were taken (:func:`alternatives`: concurrent requests of one shape
then take successive ones instead of colliding). One round trip then locks the pool and, in the same implicit
transaction, grants the first alternative whose devices are all free and whose nodes' memory still fits, unless a
waiter of equal or higher priority is queued (``sql.FAST_GRANT``). Everything the guarantees rest on is checked
there, under the lock, on a snapshot taken after it: no device granted twice, no node's memory over-committed,
all or nothing, FIFO within priority. When no alternative fits, or a waiter is ahead, nothing is written and the
request takes the locked path, which applies every rule and reaps expired leases. Only single-node requests of
teams without a quota take the fast path: a gang or a quota check stays on the locked path, where a team's usage
is read under its own lock. Placement stays in one implementation (:func:`~kiln.tasks.pools.placement.place`); on
a fresh view the first alternative is exactly what the locked path would grant, on a view a round trip old it may
be a slightly worse fit (a device freed meanwhile is not preferred), never a wrong one.

Why not ``FOR UPDATE SKIP LOCKED`` on free device rows: the schema has no free-device rows (``kiln_lease_devices``
holds the devices in use, under a UNIQUE constraint), a request's memory is an amount on a node rather than a row
to claim, and pack placement sends every concurrent request to the same node and the same lowest free GPU, which
SKIP LOCKED would turn into skips and retries. What bounded the rate was how long the lock was held, not that
there is one lock per pool; held for a few hundred microseconds of server work, one lock sustains thousands of
grants per second.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from kiln.tasks.pools import sql
from kiln.tasks.pools.allocation import Allocation, LeaseRequest, NodeAllocation
from kiln.tasks.pools.inventory import Inventory, Pool
from kiln.tasks.pools.leases import allocation_json, devices_json
from kiln.tasks.pools.placement import NodeUsage, UsageTracker, place
from kiln.tasks.pools.sql import Tx

logger = logging.getLogger(__name__)

#: Placements offered per fast-path grant: the first is the best fit on the client's view, each next one what it
#: would be if the ones before were taken by concurrent requests of the same shape.
ALTERNATIVES = 4
_CACHE_MAX = 4096


def alternatives(pool: Pool, usage: dict[str, NodeUsage], request: LeaseRequest,
                 count: int = ALTERNATIVES) -> list[tuple[NodeAllocation, ...]]:
    """Up to ``count`` placements of ``request``, each as if every one before it had been granted too."""
    out: list[tuple[NodeAllocation, ...]] = []
    usage = dict(usage)
    empty = NodeUsage()
    for _ in range(count):
        nodes = place(pool, usage, request)
        if nodes is None:
            break
        out.append(nodes)
        for n in nodes:
            u = usage.get(n.node, empty)
            usage[n.node] = NodeUsage(u.gpus | frozenset(n.gpus), u.cpus | frozenset(n.cpus), u.memory + n.memory)
    return out


class Granting:
    """The grant decisions of :class:`kiln.tasks.pools.store.LeaseStore` (a mixin: it holds the store's state)."""

    inventory: Inventory
    _allocations: dict[str, Allocation]
    _usage: dict[str, UsageTracker]
    fast_grants = 0
    """Grants this store made on the fast path (the others took the locked path)."""

    def _priority(self, request: LeaseRequest) -> int:
        return request.priority if request.priority is not None else self.inventory.teams[request.team].priority

    def _allocation(self, row: Any) -> Allocation:
        allocation = self._allocations.get(row.id)
        if allocation is None:
            if len(self._allocations) >= _CACHE_MAX:
                self._allocations.clear()
            allocation = self._allocations[row.id] = Allocation.from_json(row.allocation)
        return allocation

    def _has_quota(self, team_name: str) -> bool:
        team = self.inventory.teams.get(team_name)
        return team is not None and (team.quota_gpus, team.quota_cpus, team.quota_memory) != (None, None, None)

    def _team_over(self, tx: Tx, team_name: str, request: LeaseRequest, *, lock: bool) -> bool:
        """Whether granting ``request`` would take ``team_name`` over its quota (False when it has none)."""
        if not self._has_quota(team_name):
            return False
        team = self.inventory.teams[team_name]
        quota = (team.quota_gpus, team.quota_cpus, team.quota_memory)
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
        granted: dict[str, Allocation] = {}
        for r in rows:
            if r.state == "granted":
                granted[r.id] = self._allocation(r)
            elif r.id != lease_id and (r.priority > priority or (r.priority == priority
                                                                 and (seq is None or r.seq < seq))):
                if r.team == request.team or not self._team_over(
                        tx, r.team, LeaseRequest.from_dict(json.loads(r.request)), lock=False):
                    return None
        nodes = place(pool, self._usage.setdefault(pool.name, UsageTracker()).update(granted), request)
        if nodes is None or self._team_over(tx, request.team, request, lock=True):
            return None
        return nodes

    def _decide_or_reap(self, tx: Tx, pool: Pool, request: LeaseRequest, priority: int, seq: int | None,
                        lease_id: str | None, rows: Sequence[Any], now: float,
                        reread: tuple[sql.Stmt, dict[str, Any]]) -> tuple[NodeAllocation, ...] | None:
        # Expired leases only matter when something does not fit, so the reap runs on that path alone.
        nodes = self._decide(tx, pool, request, priority, seq, lease_id, rows)
        if nodes is None and self._reap(tx, now, pool.name):
            rows = tx.run([reread[0]], reread[1]).all()
            nodes = self._decide(tx, pool, request, priority, seq, lease_id, rows)
        return nodes

    def _try_fast(self, tx: Tx, pool: Pool, request: LeaseRequest, values: dict[str, Any]) -> Allocation | None:
        """The fast path (see the module docstring): the allocation granted, or None (nothing was written).

        ``values`` are the new lease row's, stamped with the time; ``tx`` has nothing open.
        """
        priority = values["priority"]
        granted: dict[str, Allocation] = {}
        for r in tx.once(sql.SELECT_POOL_STATE, {"pool": pool.name}).all():
            if r.state == "granted":
                granted[r.id] = self._allocation(r)
            elif r.priority >= priority:
                return None  # a waiter ahead: only the locked path may decide whether to pass it
        usage = self._usage.setdefault(pool.name, UsageTracker()).update(granted)
        allocations = [Allocation(lease_id=values["id"], pool=pool.name, nodes=nodes, ttl_s=request.ttl_s)
                       for nodes in alternatives(pool, usage, request)]
        if not allocations:
            return None
        room = {n.name: n.memory - request.memory for n in pool.nodes}
        devices = [(i, n.node, kind, str(d)) for i, a in enumerate(allocations, 1) for n in a.nodes
                   for kind, ids in (("gpu", n.gpus), ("cpu", n.cpus)) for d in ids]
        memory = [(i, n.node, room[n.node]) for i, a in enumerate(allocations, 1) for n in a.nodes] \
            if request.memory else []
        params = {**values, "a_alloc": [allocation_json(a) for a in allocations],
                  "a_devs": [devices_json(a) for a in allocations],
                  "d_alt": [d[0] for d in devices], "d_node": [d[1] for d in devices],
                  "d_kind": [d[2] for d in devices], "d_dev": [d[3] for d in devices],
                  "m_alt": [m[0] for m in memory], "m_node": [m[1] for m in memory], "m_room": [m[2] for m in memory]}
        chosen = tx.atomic([sql.LOCK_POOL, sql.FAST_GRANT], params).scalar()
        if chosen is None:
            return None
        self.fast_grants += 1
        return allocations[chosen - 1]

    @staticmethod
    def _grant_statements(tx: Tx, allocation: Allocation, params: dict[str, Any]) -> list[sql.Stmt | str]:
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

    def _reap(self, tx: Tx, now: float, pool: str, lock: Sequence[sql.Stmt] = ()) -> list[str]:
        expired = tx.run([*lock, sql.EXPIRE], {"now": now, "pool": pool}).all()
        if not expired:
            return []
        params: dict[str, Any] = {"now": now, "detail": "no heartbeat within ttl"}
        for i, r in enumerate(expired):
            params.update({f"i{i}": r.id, f"p{i}": r.pool, f"v{i}": r.devices, f"e{i}": "expire"})
        tx.run([sql.delete_devices_of(len(expired)), sql.insert_events(len(expired))], params)
        ids = [r.id for r in expired]
        logger.warning("expired %d lease(s) whose holders stopped heartbeating: %s", len(ids), ", ".join(ids))
        return ids
