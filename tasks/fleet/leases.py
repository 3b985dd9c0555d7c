"""The cores a model's replicas lease from a resource pool, so that serving and training share capacity honestly.

Each replica holds one lease (``replicas.cpus`` cores of ``replicas.pool``, heartbeated on a thread) for as long
as it runs; the fleet pins the replica to the granted cores. A lease that cannot be granted now leaves the replica
unstarted (the fleet tries again); a deployment whose ``replicas.max`` the pool could never hold is refused before
anything starts (:func:`check_capacity`).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING

from kiln.tasks.pools.allocation import Allocation, LeaseRequest, Owner
from kiln.tasks.pools.keepalive import KeepAlive
from kiln.tasks.pools.placement import copies_at_once
from kiln.tasks.processes import alive

if TYPE_CHECKING:
    from kiln.tasks.pools.inventory import Inventory
    from kiln.tasks.pools.store import LeaseStore
    from kiln.tasks.serving.deployment import Deployment
    from kiln.tasks.serving.scaling import ReplicaSettings

log = logging.getLogger(__name__)

#: A replica's lease expires unless heartbeated within this (a killed fleet's cores come back after it).
LEASE_TTL_S = 30.0
#: The team a replica's lease counts against.
SERVING_TEAM = "default"


def replica_request(settings: ReplicaSettings) -> LeaseRequest:
    """The lease one replica asks for."""
    return LeaseRequest(pool=settings.pool, cpus=settings.cpus, team=SERVING_TEAM, ttl_s=LEASE_TTL_S)


def check_capacity(inventory: Inventory, settings: ReplicaSettings, *, canary: bool = False) -> None:
    """Refuse replica settings the pool could never hold, even with every core free.

    Args:
        inventory: the pools.
        settings: the replica settings.
        canary: the deployment has a canary, which runs on a replica of its own beside ``replicas.max``.

    Raises:
        ValueError: ``replicas.pool`` is unknown, or the pool holds fewer than ``replicas.max`` replicas (plus the
            canary's) of ``replicas.cpus`` cores; the message names the field and the fix.
    """
    if settings.pool not in inventory.pools:
        raise ValueError(f"replicas.pool {settings.pool!r} is not a pool of the inventory (pools: "
                         f"{', '.join(sorted(inventory.pools))}); name one of them")
    wanted = settings.max + (1 if canary else 0)
    try:
        fits = copies_at_once(inventory, replica_request(settings), wanted)
    except ValueError as exc:  # UnsatisfiableRequestError: not even one replica fits
        raise ValueError(f"replicas.cpus: one replica of {settings.cpus} core(s) never fits pool "
                         f"{settings.pool!r} ({exc}); lower replicas.cpus") from None
    if fits < wanted:
        with_canary = " plus the canary's replica" if canary else ""
        raise ValueError(f"replicas.max is {settings.max}{with_canary} but pool {settings.pool!r} holds at most "
                         f"{fits} replica(s) of {settings.cpus} core(s); lower replicas.max (or replicas.cpus), or "
                         "add nodes to the pool")


class ReplicaLeases:
    """The leases of one fleet's replicas.

    Args:
        store: the lease store (``KILN_POOLS_DB_URL``).
        settings: the pool and the cores per replica.
        model: the served model, named in each lease's owner.
    """

    def __init__(self, store: LeaseStore, settings: ReplicaSettings, model: str):
        self.store, self.settings, self.model = store, settings, model
        self._alive: dict[str, KeepAlive] = {}

    @classmethod
    def open(cls, deployment: Deployment) -> ReplicaLeases:
        """The leases of ``deployment``'s replicas in the settings' lease store, its capacity checked.

        Raises:
            ValueError: the pool cannot hold ``replicas.max`` replicas (:func:`check_capacity`).
        """
        from kiln.tasks.pools.store import LeaseStore
        from kiln.tasks.serving.scaling import ReplicaSettings

        settings = deployment.replicas or ReplicaSettings()
        store = LeaseStore.from_settings()
        try:
            check_capacity(store.inventory, settings, canary=deployment.canary is not None)
        except BaseException:
            store.close()
            raise
        leases = cls(store, settings, deployment.model)
        leases.release_orphans()
        return leases

    def release_orphans(self) -> list[str]:
        """Release the leases a fleet of this model on this host held when it died (a SIGKILL, the OOM killer): its
        replacement takes the cores back now rather than after the leases' TTL. A lease whose pid runs again (a
        reused pid) is left to expire."""
        host, released = socket.gethostname(), []
        for lease in self.store.leases(self.settings.pool):
            owner = lease.owner
            if lease.state == "granted" and owner.dag_id == self._owner_name and owner.host == host \
                    and owner.pid != os.getpid() and not alive(owner.pid):
                if self.store.release(lease.id, reason=f"its fleet (pid {owner.pid}) is gone"):
                    released.append(lease.id)
        if released:
            log.warning("released %d lease(s) of a fleet of %s that is gone: %s", len(released), self.model,
                        ", ".join(released))
        return released

    @property
    def _owner_name(self) -> str:
        return f"serve:{self.model}"

    def acquire(self, slot: int) -> Allocation | None:
        """A lease for the replica of ``slot``, heartbeated until :meth:`release`; ``None`` when the pool has no
        room now."""
        owner = Owner(dag_id=self._owner_name, run_id="replicas", task_id=f"r{slot}",
                      host=socket.gethostname(), pid=os.getpid())
        lease = self.store.try_acquire(replica_request(self.settings), owner)
        if lease is not None:
            self._alive[lease.lease_id] = KeepAlive(
                self.store, lease.lease_id, LEASE_TTL_S,
                on_lost=lambda: log.error("the lease of replica r%d of %s was lost (expired or revoked)", slot,
                                          self.model))
        return lease

    def release(self, lease: Allocation | None) -> None:
        """Give a replica's cores back (``None``: nothing to give)."""
        if lease is None:
            return
        keepalive = self._alive.pop(lease.lease_id, None)
        if keepalive is not None:
            keepalive.stop()
        try:
            self.store.release(lease.lease_id, reason="replica stopped")
        except Exception as exc:  # noqa: BLE001 - the lease then expires after its TTL; the fleet goes on
            log.warning("could not release lease %s (it expires in %g s): %s", lease.lease_id, LEASE_TTL_S, exc)

    def close(self) -> None:
        """Release every lease still held and close the store."""
        for lease_id in list(self._alive):
            self._alive.pop(lease_id).stop()
            try:
                self.store.release(lease_id, reason="fleet stopped")
            except Exception as exc:  # noqa: BLE001 - as above
                log.warning("could not release lease %s: %s", lease_id, exc)
        self.store.close()
