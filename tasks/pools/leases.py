"""What the lease store returns: lease records, audit events and the JSON snapshot of pools, queues and leases."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kiln.tasks.pools.allocation import Allocation, LeaseRequest, Owner, PoolError
from kiln.tasks.pools.inventory import Inventory
from kiln.tasks.pools.placement import usage_of

LIVE_STATES = ("waiting", "granted")


class LeaseNotFoundError(PoolError, LookupError):
    """No lease has this id."""


@dataclass(frozen=True)
class LeaseRecord:
    """One lease (or queue entry) as stored."""

    id: str
    pool: str
    team: str
    priority: int
    """The effective priority (the request's, else its team's)."""
    state: str
    """``waiting``, ``granted``, ``released``, ``expired``, ``cancelled`` or ``revoked``."""
    owner: Owner
    request: LeaseRequest
    allocation: Allocation | None
    """The devices, once granted."""
    created_at: float
    granted_at: float | None
    expires_at: float
    """Reclaimed after this unless heartbeated (meaningful while waiting or granted)."""
    ended_at: float | None
    seq: int = 0
    """Queue position in its pool (the queue is served by priority, then ``seq``); a lease granted without
    queueing carries the pool's current counter."""

    @classmethod
    def from_row(cls, row: Any) -> LeaseRecord:
        """From a ``kiln_leases`` row."""
        owner = Owner(dag_id=row.dag_id, run_id=row.run_id, task_id=row.task_id, try_number=row.try_number,
                      host=row.host, pid=row.pid)
        return cls(id=row.id, pool=row.pool, team=row.team, priority=row.priority, state=row.state, owner=owner,
                   request=LeaseRequest.from_dict(json.loads(row.request)),
                   allocation=Allocation.from_json(row.allocation) if row.allocation else None,
                   created_at=row.created_at, granted_at=row.granted_at, expires_at=row.expires_at,
                   ended_at=row.ended_at, seq=row.seq)


@dataclass(frozen=True)
class AuditEvent:
    """One line of a pool's history, in commit order of its pool (``id`` increases)."""

    id: int
    ts: float
    lease_id: str
    pool: str
    event: str
    """``request``, ``grant``, ``release``, ``expire``, ``cancel``, ``timeout``, ``preempt`` (the lease was asked
    to give its devices back; ``detail`` names the lease that takes them) or ``revoke`` (it did not, in time)."""
    devices: dict[str, dict[str, Any]]
    """``{node: {"gpus": [...], "cpus": [...], "memory": bytes}}`` granted or freed by this event."""
    detail: str

    @classmethod
    def from_row(cls, row: Any) -> AuditEvent:
        """From a ``kiln_lease_events`` row."""
        return cls(id=row.id, ts=row.ts, lease_id=row.lease_id, pool=row.pool, event=row.event,
                   devices=json.loads(row.devices or "{}"), detail=row.detail)


@dataclass(frozen=True)
class Preemption:
    """A granted lease asked to give its devices back (see :mod:`kiln.tasks.pools.preemption`)."""

    lease_id: str
    by_lease: str
    """The queued lease that takes the devices."""
    requested_at: float
    deadline: float
    """Epoch seconds; a lease still held then is revoked."""


def allocation_json(allocation: Allocation) -> str:
    """Same text as ``allocation.to_json()``, built without ``dataclasses.asdict`` (it runs under a pool lock)."""
    nodes = [{"address": n.address, "cpus": list(n.cpus), "docker_url": n.docker_url, "gpus": list(n.gpus),
              "memory": n.memory, "node": n.node} for n in allocation.nodes]
    return json.dumps({"lease_id": allocation.lease_id, "nodes": nodes, "pool": allocation.pool,
                       "ttl_s": allocation.ttl_s}, sort_keys=True)


def devices_json(allocation: Allocation | None) -> str:
    """The ``devices`` column of an audit event."""
    if allocation is None:
        return "{}"
    return json.dumps({n.node: {"gpus": list(n.gpus), "cpus": list(n.cpus), "memory": n.memory}
                       for n in allocation.nodes}, sort_keys=True)


def _entry(lease: LeaseRecord, now: float) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": lease.id, "team": lease.team, "priority": lease.priority,
                             "owner": lease.owner.label(), "request": lease.request.describe(),
                             "age_s": round(now - (lease.granted_at or lease.created_at), 3),
                             "expires_in_s": round(lease.expires_at - now, 3)}
    if lease.allocation is not None:
        entry["nodes"] = [{"node": n.node, "gpus": list(n.gpus), "cpus": n.cpuset(), "memory": n.memory}
                          for n in lease.allocation.nodes]
    return entry


def build_snapshot(inventory: Inventory, live: list[LeaseRecord], now: float) -> dict[str, Any]:
    """Capacity and usage per pool and node, each pool's queue in grant order, active leases, team usage."""
    out: dict[str, Any] = {"time": now, "inventory": inventory.source, "pools": {}, "teams": {}}
    for pool in inventory.pools.values():
        mine = [lease for lease in live if lease.pool == pool.name]
        granted = [lease for lease in mine if lease.state == "granted"]
        usage = usage_of(lease.allocation for lease in granted if lease.allocation is not None)
        nodes = {}
        for node in pool.nodes:
            used = usage.get(node.name)
            nodes[node.name] = {
                "address": node.address,
                "gpus": {"total": len(node.gpus), "used": len(used.gpus) if used else 0,
                         "held": sorted(used.gpus) if used else []},
                "cpus": {"total": len(node.cpus), "used": len(used.cpus) if used else 0},
                "memory": {"total": node.memory, "used": used.memory if used else 0},
            }
        waiting = sorted((lease for lease in mine if lease.state == "waiting"), key=lambda r: (-r.priority, r.seq))
        out["pools"][pool.name] = {"placement": pool.placement, "nodes": nodes,
                                   "waiting": [_entry(lease, now) for lease in waiting],
                                   "leases": [_entry(lease, now) for lease in sorted(granted, key=lambda r: r.id)]}
    for team in inventory.teams.values():
        held = [lease.request for lease in live if lease.state == "granted" and lease.team == team.name]
        out["teams"][team.name] = {
            "priority": team.priority,
            "quota": {"gpus": team.quota_gpus, "cpus": team.quota_cpus, "memory": team.quota_memory},
            "used": {"gpus": sum(r.gpus * r.nodes for r in held), "cpus": sum(r.cpus * r.nodes for r in held),
                     "memory": sum(r.memory * r.nodes for r in held)},
        }
    return out

