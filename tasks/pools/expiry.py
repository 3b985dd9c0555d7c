"""Leases whose holders stopped heartbeating: expired (state ``expired``, an ``expire`` event) and their devices
freed, by the grant that would not fit otherwise, by a waiting request's periodic sweep, or by ``reap()``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from kiln.tasks.pools import sql
from kiln.tasks.pools.inventory import Inventory
from kiln.tasks.pools.sql import Tx

logger = logging.getLogger(__name__)

#: A process sweeps every pool for expired leases at most this often while its requests wait (real seconds).
SWEEP_INTERVAL_S = 2.0


class Expiry:
    """The expiry side of :class:`kiln.tasks.pools.store.LeaseStore` (a mixin: it uses the store's transactions,
    clock and inventory)."""

    inventory: Inventory
    _clock: Callable[[], float]
    _next_sweep: float
    _tx: Callable[[], AbstractContextManager[Tx]]

    def _free(self, tx: Tx, ended: Sequence[Any], now: float, event: str, detail: str) -> None:
        """Free the devices of leases just ended (rows of ``id, pool, devices``) and audit each with ``event``."""
        params: dict[str, Any] = {"now": now, "detail": detail}
        for i, r in enumerate(ended):
            params.update({f"i{i}": r.id, f"p{i}": r.pool, f"v{i}": r.devices, f"e{i}": event})
        tx.run([sql.delete_devices_of(len(ended)), sql.insert_events(len(ended))], params)

    def _reap(self, tx: Tx, now: float, pool: str, lock: Sequence[sql.Stmt] = ()) -> list[str]:
        expired = tx.run([*lock, sql.EXPIRE], {"now": now, "pool": pool}).all()
        if not expired:
            return []
        self._free(tx, expired, now, "expire", "no heartbeat within ttl")
        ids = [r.id for r in expired]
        logger.warning("expired %d lease(s) whose holders stopped heartbeating: %s", len(ids), ", ".join(ids))
        return ids

    def _sweep_if_due(self) -> None:
        """Reap every pool now and then while requests wait: a dead lease in another pool may hold team quota."""
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + SWEEP_INTERVAL_S
            self.reap()

    def reap(self) -> list[str]:
        """Expire every granted lease and queue entry past its ``expires_at`` and free their devices.

        Returns:
            The ids expired.
        """
        expired: list[str] = []
        for pool in sorted(self.inventory.pools):
            with self._tx() as tx:
                expired += self._reap(tx, self._clock(), pool, lock=[sql.LOCK_POOL])
                tx.commit()
        return expired
