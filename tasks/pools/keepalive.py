"""Keeping a lease alive from a holder's process: a heartbeat thread, and ``hold`` for in-process callers."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from kiln.tasks.pools.allocation import Allocation, LeaseLostError, LeaseRequest, Owner

if TYPE_CHECKING:
    from kiln.tasks.pools.leases import Preemption
    from kiln.tasks.pools.store import LeaseStore

logger = logging.getLogger(__name__)

#: How often a preemptible lease's holder looks whether it was preempted (seconds): the preempting request waits
#: at least this long.
PREEMPT_POLL_S = 1.0


class KeepAlive:
    """Heartbeats ``lease_id`` every ``ttl_s / 3`` seconds on a daemon thread, from construction until
    :meth:`stop`.

    ``lost`` is set, ``on_lost`` is called (on the heartbeat thread) and the thread ends when the store says the
    lease is no longer granted: the holder must stop using its devices. A failing database is retried at the next
    beat; the lease survives that as long as one beat in ``ttl_s`` gets through.

    With ``on_preempted`` (a preemptible lease) it also looks every :data:`PREEMPT_POLL_S` seconds whether the
    lease was preempted, and then sets ``preempted`` and calls it once, on a thread of its own, with the
    :class:`~kiln.tasks.pools.leases.Preemption` (whose deadline the holder must release by); it goes on
    heartbeating until :meth:`stop`.
    """

    def __init__(self, store: LeaseStore, lease_id: str, ttl_s: float,
                 on_lost: Callable[[], None] | None = None,
                 on_preempted: Callable[[Preemption], None] | None = None):
        self.store = store
        self.lease_id = lease_id
        self.on_lost = on_lost
        self.on_preempted = on_preempted
        self.interval_s = ttl_s / 3
        self.lost = threading.Event()
        self.preempted = threading.Event()
        self.preemption: Preemption | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kiln-keepalive-{lease_id[:8]}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tick = min(self.interval_s, PREEMPT_POLL_S) if self.on_preempted is not None else self.interval_s
        next_beat = time.monotonic() + self.interval_s
        while not self._stop.wait(tick):
            try:
                if self.on_preempted is not None and not self.preempted.is_set():
                    self._look_for_preemption()
                if time.monotonic() >= next_beat:
                    self.store.heartbeat(self.lease_id)
                    next_beat = time.monotonic() + self.interval_s  # a failed beat is tried again next tick
            except LeaseLostError as exc:
                logger.error("lease %s lost: %s", self.lease_id, exc)
                self.lost.set()
                if self.on_lost is not None:
                    self.on_lost()
                return
            except Exception as exc:  # a database hiccup: the next beat may get through before the ttl runs out
                logger.warning("heartbeat of lease %s failed (%s: %s); retrying in %.1fs", self.lease_id,
                               type(exc).__name__, exc, tick)

    def _look_for_preemption(self) -> None:
        preemption = self.store.preemption(self.lease_id)
        if preemption is None:
            return
        self.preemption = preemption
        self.preempted.set()
        logger.warning("lease %s is preempted by lease %s: give the devices back within %.0f s", self.lease_id,
                       preemption.by_lease, preemption.deadline - time.time())
        assert self.on_preempted is not None
        # On a thread of its own: stopping the work may take the whole grace period, and the lease must go on
        # being heartbeated meanwhile.
        threading.Thread(target=self.on_preempted, args=(preemption,), name=f"kiln-preempt-{self.lease_id[:8]}",
                         daemon=True).start()

    def stop(self) -> None:
        """Stop heartbeating (idempotent); returns once the thread has ended."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> KeepAlive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def hold(store: LeaseStore, request: LeaseRequest, owner: Owner, *, timeout_s: float) -> Iterator[Allocation]:
    """Acquire ``request`` (waiting up to ``timeout_s``), heartbeat it while the block runs, release it after.

    Raises:
        UnsatisfiableRequestError: it could never fit.
        PoolTimeoutError: not granted in time.
        LeaseLostError: at the end of the block, if the lease was lost while it ran (its devices may have been
            used by another job meanwhile, so the block's results are suspect).
    """
    allocation = store.acquire(request, owner, timeout_s=timeout_s)
    keepalive = KeepAlive(store, allocation.lease_id, request.ttl_s)
    try:
        yield allocation
    finally:
        keepalive.stop()
        store.release(allocation.lease_id)
    if keepalive.lost.is_set():
        raise LeaseLostError(f"lease {allocation.lease_id} expired while it was held: no heartbeat got through "
                             f"within its ttl of {request.ttl_s:g}s")
