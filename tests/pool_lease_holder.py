"""Test helper (``python tests/pool_lease_holder.py URL INVENTORY TTL_S``): lease every GPU of pool ``p``, keep the
lease alive, print ``granted <lease id>`` and wait to be killed. ``test_pool_reaper`` kills it with SIGKILL, the
way an OOM kill or a lost worker ends a job: no ``finally`` runs and no release is sent."""

from __future__ import annotations

import os
import sys
import threading

from kiln.tasks.pools.allocation import LeaseRequest, Owner
from kiln.tasks.pools.inventory import load_inventory
from kiln.tasks.pools.keepalive import KeepAlive
from kiln.tasks.pools.store import LeaseStore


def main() -> None:
    url, inventory, ttl_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
    store = LeaseStore(url, load_inventory(inventory))
    allocation = store.acquire(LeaseRequest(pool="p", gpus=2, ttl_s=ttl_s), Owner(host="holder", pid=os.getpid()),
                               timeout_s=60)
    KeepAlive(store, allocation.lease_id, ttl_s)
    print(f"granted {allocation.lease_id}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
