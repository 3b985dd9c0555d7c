"""A lease whose holder is killed (SIGKILL: no release, no ``finally``) comes back within its TTL plus the
reaper's interval, and the history says it expired; while the holder lives, its keep-alive holds the lease well
past the TTL."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiln.tasks.pools.allocation import LeaseRequest, Owner
from kiln.tasks.pools.inventory import load_inventory
from kiln.tasks.pools.store import LeaseStore

pytestmark = pytest.mark.integration

TTL_S = 2.0
REAP_EVERY_S = 0.5
SLACK_S = 1.5  # process scheduling on a loaded 2-core machine, and the requester's own poll interval
INVENTORY = "pools: {p: {nodes: [{name: box, cpus: 2, memory: 8GiB, gpus: [{index: 0, memory: 16GiB}, " \
            "{index: 1, memory: 16GiB}]}]}}\n"


def kill_and_reclaim(url: str, tmp_path: Path, repo_root: Path) -> None:
    inventory = tmp_path / "pools.yaml"
    inventory.write_text(INVENTORY)
    reaper = subprocess.Popen([sys.executable, "-m", "kiln.tasks.pools", "--db", url, "--inventory", str(inventory),
                               "reap", "--loop", str(REAP_EVERY_S)], cwd=repo_root)
    holder = subprocess.Popen([sys.executable, str(repo_root / "tests" / "pool_lease_holder.py"), url,
                               str(inventory), str(TTL_S)], cwd=repo_root, stdout=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("granted "), f"the holder did not get its lease (exit {holder.poll()})"
        dead = line.split()[1]
        store = LeaseStore(url, load_inventory(inventory))
        time.sleep(TTL_S * 1.5)  # heartbeats must carry the lease past its TTL while the holder lives
        assert store.lease(dead).state == "granted"
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        killed = time.monotonic()
        allocation = store.acquire(LeaseRequest(pool="p", gpus=2), Owner(host="next", pid=1),
                                   timeout_s=TTL_S + REAP_EVERY_S + 30, poll_s=0.05)
        waited = time.monotonic() - killed
        assert allocation.master.gpus == ("0", "1")
        assert waited <= TTL_S + REAP_EVERY_S + SLACK_S, f"devices came back {waited:.2f}s after the kill"
        assert [e.event for e in store.history(lease_id=dead)] == ["grant", "expire"]
        assert store.lease(dead).state == "expired"
        store.release(allocation.lease_id)
        store.close()
    finally:
        for proc in (holder, reaper):
            proc.kill()
            proc.wait(timeout=10)


def test_killed_holder_frees_its_devices_sqlite(tmp_path: Path, repo_root: Path) -> None:
    kill_and_reclaim(f"sqlite:///{tmp_path / 'pools.db'}", tmp_path, repo_root)


@pytest.mark.postgres
def test_killed_holder_frees_its_devices_postgres(postgres_url: str, tmp_path: Path, repo_root: Path) -> None:
    kill_and_reclaim(postgres_url, tmp_path, repo_root)
