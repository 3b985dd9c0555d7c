"""Airflow side of resource pools: a hook for the lease store, a trigger that waits for a grant, and a base
operator that runs its work on leased devices.

A task that cannot be granted its devices at once defers: the request waits in the pool's queue (FIFO within
priority) while the triggerer polls it, so it occupies no worker slot. The lease is granted in the triggerer and
held across the deferral; the resumed task heartbeats it while it works and releases it in ``finally`` and in
``on_kill``. A worker that dies without either stops heartbeating, and the lease is reclaimed after its TTL.

A preemptible lease may be preempted by a request of higher priority (:mod:`kiln.tasks.pools.preemption`): the task
asks its work to checkpoint and stop within the grace period (:meth:`PooledOperator.preempt_work`), gives the
devices back, queues the same request again and defers, and resumes the work (from its checkpoint) when granted.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook, BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException
from airflow.triggers.base import BaseTrigger, TriggerEvent

if TYPE_CHECKING:
    from kiln.tasks.pools.allocation import Allocation, LeaseRequest, Owner
    from kiln.tasks.pools.leases import Preemption
    from kiln.tasks.pools.store import LeaseStore

#: Seconds of a preempted lease's grace period kept for giving the devices back after the work stopped.
_RELEASE_MARGIN_S = 2.0
#: Seconds a trigger holds a grant it got right after the task deferred (see PoolLeaseTrigger.run).
GRANT_SETTLE_S = 15.0
#: Extra seconds the deferral may take beyond the request's own wait timeout (the trigger enforces the latter
#: itself and reports it, so Airflow's generic deferral timeout is only a backstop).
_DEFER_SLACK_S = 60


class ResourcePoolHook(BaseHook):
    """A stateless client of the lease store named by the settings (``KILN_POOLS_DB_URL``, ``KILN_POOLS_FILE``)."""

    def get_store(self) -> LeaseStore:
        from kiln.tasks.pools.store import LeaseStore

        return LeaseStore.from_settings()


def owner_from_context(context: Any) -> Owner:
    """The lease owner for the running task try."""
    from kiln.tasks.pools.allocation import Owner

    ti = context["ti"]
    return Owner(dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id, try_number=int(ti.try_number or 0),
                 host=socket.gethostname(), pid=os.getpid())


class PoolLeaseTrigger(BaseTrigger):
    """Polls a waiting lease request until it is granted, lost, or ``deadline`` (epoch seconds) passes.

    Each poll also heartbeats the waiting entry, so a request whose triggerer died leaves the queue after its TTL.
    Events: ``{"status": "granted", "allocation": {...}}``, ``{"status": "timeout", "message": ...}`` (the entry is
    cancelled) or ``{"status": "lost", "message": ...}``.
    """

    def __init__(self, lease_id: str, deadline: float, poll_s: float = 1.0, settle_s: float = 0.0):
        super().__init__()
        self.lease_id = lease_id
        self.deadline = deadline
        self.poll_s = poll_s
        self.settle_s = settle_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("kiln.operators.pools.PoolLeaseTrigger",
                {"lease_id": self.lease_id, "deadline": self.deadline, "poll_s": self.poll_s,
                 "settle_s": self.settle_s})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from kiln.tasks.pools.allocation import LeaseLostError

        started = time.monotonic()
        store = await asyncio.to_thread(ResourcePoolHook().get_store)
        self.log.info("waiting for lease %s", self.lease_id)
        try:
            while True:
                try:
                    allocation = await asyncio.to_thread(store.try_grant, self.lease_id)
                except LeaseLostError as exc:
                    yield TriggerEvent({"status": "lost", "lease_id": self.lease_id, "message": str(exc)})
                    return
                if allocation is not None:
                    # Airflow 3.3 fails a task whose trigger fires so soon after it deferred that the resumed try
                    # is running before the scheduler has taken in the deferring try's exit (apache/airflow#72716):
                    # the grant is handed over once that has settled. The lease outlives the wait (its ttl).
                    settle = self.settle_s - (time.monotonic() - started)
                    if settle > 0:
                        self.log.info("lease %s granted; handing it over in %.1f s", self.lease_id, settle)
                        await asyncio.sleep(settle)
                    self.log.info("lease %s granted", self.lease_id)
                    yield TriggerEvent({"status": "granted", "allocation": allocation.to_dict()})
                    return
                if time.time() >= self.deadline:
                    await asyncio.to_thread(store.release, self.lease_id, "timeout")
                    yield TriggerEvent({"status": "timeout", "lease_id": self.lease_id,
                                        "message": "resource request still waiting at its wait timeout; cancelled"})
                    return
                await asyncio.sleep(self.poll_s)
        finally:
            store.close()


class PooledOperator(BaseOperator):
    """Base for operators whose work runs on devices leased from a resource pool.

    Subclasses implement :meth:`lease_request` (what to ask for) and :meth:`run_leased` (the work, given the
    :class:`~kiln.tasks.pools.allocation.Allocation`), :meth:`stop_work` if the work can be interrupted, and
    :meth:`preempt_work` if it can checkpoint first. This base acquires (deferring while the request waits),
    heartbeats, stops the work if the lease is lost, and releases in ``finally`` and in :meth:`on_kill`; a
    preempted lease's work is asked to stop, and the request queued again.
    """

    #: Seconds between polls of a waiting request in the triggerer.
    poll_interval_s: float = 1.0
    #: The least seconds between a deferral and the trigger's grant event (see :class:`PoolLeaseTrigger`).
    grant_settle_s: float = GRANT_SETTLE_S

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._lease_id: str | None = None
        self._store: LeaseStore | None = None

    # -- to implement ------------------------------------------------------------------------------------------
    def lease_request(self, context: Any) -> tuple[LeaseRequest, float]:
        """The request and how long it may wait to be granted, in seconds."""
        raise NotImplementedError

    def run_leased(self, context: Any, allocation: Allocation) -> Any:
        """Do the work on ``allocation``'s devices; the return value becomes the task's XCom."""
        raise NotImplementedError

    def stop_work(self) -> None:
        """Interrupt :meth:`run_leased` from another thread (on_kill, lost lease). Safe to call twice."""

    def preempt_work(self, grace_s: float) -> None:
        """Ask :meth:`run_leased` (from another thread) to checkpoint and stop within ``grace_s`` seconds: its
        preemptible lease was preempted. The default stops it at once (:meth:`stop_work`)."""
        self.stop_work()

    def wait_trigger(self, context: Any, lease_id: str, deadline: float) -> PoolLeaseTrigger:
        """The trigger that waits for the queued ``lease_id`` while the task is deferred."""
        return PoolLeaseTrigger(lease_id=lease_id, deadline=deadline, poll_s=self.poll_interval_s,
                                settle_s=self.grant_settle_s)

    # -- the lease protocol --------------------------------------------------------------------------------------
    def execute(self, context: Any) -> Any:
        from kiln.tasks.pools.allocation import UnsatisfiableRequestError

        request, wait_timeout_s = self.lease_request(context)
        store = self._store = ResourcePoolHook().get_store()
        try:
            store.validate(request)  # a request that can never fit fails now, not after the wait timeout
        except UnsatisfiableRequestError as exc:
            store.close()
            raise AirflowFailException(str(exc)) from exc
        allocation = store.try_acquire(request, owner_from_context(context))
        if allocation is None:
            allocation = self._queue(context, store, request, wait_timeout_s)
        return self._run(context, request, allocation)

    def _queue(self, context: Any, store: LeaseStore, request: LeaseRequest, wait_timeout_s: float) -> Allocation:
        """Queue ``request``; return its grant if it comes while the leases it preempted give way (seconds: the
        worker is kept for that), else defer until the trigger reports it (then :meth:`execute_granted`)."""
        lease_id = store.enqueue(request, owner_from_context(context))
        try:
            allocation = store.try_grant(lease_id)  # the first poll decides on preempting
            until = store.preempting_for(lease_id)
            while allocation is None and until is not None and time.time() < until + _RELEASE_MARGIN_S:
                time.sleep(self.poll_interval_s)
                allocation = store.try_grant(lease_id)
        except BaseException:
            store.release(lease_id, reason="cancelled")
            store.close()
            raise
        if allocation is not None:
            self.log.info("lease %s granted once the preempted lease(s) gave way", lease_id)
            return allocation
        store.close()  # the task leaves its worker while it waits; the trigger opens a store of its own
        self.log.info("%s does not fit now; lease %s waits in the queue of pool %r (deferring, up to %d s)",
                      request.describe(), lease_id, request.pool, wait_timeout_s)
        self.defer(trigger=self.wait_trigger(context, lease_id, time.time() + wait_timeout_s),
                   method_name="execute_granted", timeout=timedelta(seconds=wait_timeout_s + _DEFER_SLACK_S))

    def execute_granted(self, context: Any, event: dict[str, Any]) -> Any:
        """Resumes after the trigger fired: run on the granted lease, or fail with the trigger's reason."""
        from kiln.tasks.pools.allocation import Allocation

        if event.get("status") != "granted":
            raise AirflowException(f"lease {event.get('lease_id')} not granted: {event.get('message')}")
        self._store = ResourcePoolHook().get_store()
        request, _ = self.lease_request(context)
        return self._run(context, request, Allocation.from_dict(event["allocation"]))

    def _run(self, context: Any, request: LeaseRequest, allocation: Allocation) -> Any:
        from kiln.tasks.pools.allocation import LeaseLostError
        from kiln.tasks.pools.keepalive import KeepAlive

        store = self._store
        assert store is not None
        self._lease_id = allocation.lease_id
        nodes = "; ".join(f"{n.node}: GPUs [{n.cuda_visible_devices()}] CPUs [{n.cpuset()}]"
                          for n in allocation.nodes)
        self.log.info("holding lease %s in pool %r (%s)%s", allocation.lease_id, allocation.pool, nodes,
                      ", preemptible" if request.preemptible else "")
        # Heartbeats from here until stop(); a lost lease stops the work, since its devices may be re-granted; a
        # preempted one asks the work to checkpoint and stop before the deadline.
        keep = KeepAlive(store, allocation.lease_id, allocation.ttl_s, on_lost=self.stop_work,
                         on_preempted=self._on_preempted if request.preemptible else None)
        try:
            try:
                result = self.run_leased(context, allocation)
            except AirflowSkipException:
                raise  # an outcome (a pruned trial), whatever else happened meanwhile
            except Exception:
                if not keep.preempted.is_set():
                    raise
            else:
                if keep.lost.is_set():
                    raise LeaseLostError(f"lease {allocation.lease_id} was lost while the task ran")
                return result  # it finished before it had to stop: the preemption costs it nothing
        finally:
            keep.stop()
            by = keep.preemption.by_lease if keep.preemption is not None else None
            self._release(store, allocation.lease_id, f"preempted by lease {by}" if by else "released")
            store.close()
        # Preempted: the devices are back in the pool; wait for new ones, holding no worker, and resume there.
        self.log.warning("lease %s was preempted by lease %s: the work stopped%s; queueing the request again",
                         allocation.lease_id, by, " (and the lease was revoked)" if keep.lost.is_set() else "")
        _, wait_timeout_s = self.lease_request(context)
        self._store = ResourcePoolHook().get_store()
        return self._run(context, request, self._queue(context, self._store, request, wait_timeout_s))

    def _on_preempted(self, preemption: Preemption) -> None:
        # A margin for the release to reach the store before the preempting request revokes the lease.
        grace_s = max(1.0, preemption.deadline - time.time() - _RELEASE_MARGIN_S)
        self.log.warning("lease preempted by lease %s: asking the work to checkpoint and stop within %.0f s",
                         preemption.by_lease, grace_s)
        self.preempt_work(grace_s)

    def _release(self, store: LeaseStore, lease_id: str, reason: str = "released") -> None:
        if store.release(lease_id, reason=reason):
            self.log.info("released lease %s", lease_id)
        self._lease_id = None

    def on_kill(self) -> None:
        self.stop_work()
        lease_id, store = self._lease_id, self._store
        if lease_id is not None and store is not None:
            self._release(store, lease_id)
