"""Many processes fight over a few GPUs: no device is ever held by two leases, on SQLite and on PostgreSQL.

32 processes, each with its own ``LeaseStore`` (own engine, own connections), run ``try_acquire`` with a short
random back-off and release at once, until 5,000+ grants have succeeded in all, on a pool of 2 nodes x 2 GPUs
with requests of 1 or 2 GPUs (plus CPUs and memory). Afterwards the audit history is replayed in id order (the
order grants took effect in the pool): every grant must find its devices free, every release must free what its
lease held, and nothing may be left held, queued or recorded in the device table.

On PostgreSQL a second run mixes every kind of grant: single-node requests, gangs, a higher priority, a team with
a quota and requests that queue and time out, so grants of queued entries race immediate ones; the replay also
checks the team's quota at every step.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from kiln.tasks.pools.allocation import LeaseRequest, Owner, PoolTimeoutError
from kiln.tasks.pools.inventory import GpuDevice, Inventory, Node, Pool, Team
from kiln.tasks.pools.leases import AuditEvent
from kiln.tasks.pools.store import LeaseStore
from kiln.tasks.pools.tables import metadata

pytestmark = pytest.mark.integration

GiB = 1024**3
PROCESSES = 32
CYCLES = 5_000
PER_PROCESS = -(-CYCLES // PROCESSES)
NODE_MEMORY = 8 * GiB
CAPPED_GPUS = 2
INVENTORY = Inventory(
    pools={"scarce": Pool("scarce", tuple(
        Node(f"n{i}", f"10.0.0.{i}", None, (0, 1, 2, 3), NODE_MEMORY,
             (GpuDevice(f"GPU-{i}a", 0, f"GPU-{i}a", 16 * GiB), GpuDevice(f"GPU-{i}b", 1, f"GPU-{i}b", 16 * GiB)))
        for i in range(2)), "pack")},
    teams={"default": Team("default"), "capped": Team("capped", quota_gpus=CAPPED_GPUS)}, source="stress test")
REQUESTS = [LeaseRequest(pool="scarce", gpus=1, cpus=1, memory=3 * GiB),
            LeaseRequest(pool="scarce", gpus=2, cpus=2, memory=2 * GiB),
            LeaseRequest(pool="scarce", gpus=1, memory=GiB)]
MIXED_PER_PROCESS = 25
#: (how it is asked: try_acquire, or acquire that queues and may time out, request). The queued ones have a low
#: priority, so that the others pass them instead of all waiting behind them.
MIXED = [("try", REQUESTS[0]), ("try", REQUESTS[2]), ("try", LeaseRequest(pool="scarce", cpus=1, memory=3 * GiB)),
         ("try", LeaseRequest(pool="scarce", nodes=2, gpus=1, cpus=1, memory=GiB)),
         ("try", LeaseRequest(pool="scarce", gpus=1, team="capped")),
         ("try", LeaseRequest(pool="scarce", gpus=1, cpus=1, priority=5)),
         ("try", REQUESTS[1]), ("queue", LeaseRequest(pool="scarce", gpus=2, team="capped", priority=-1)),
         ("queue", LeaseRequest(pool="scarce", gpus=1, cpus=1, memory=GiB, priority=-1))]


def worker(url: str, seed: int, barrier: mp.synchronize.Barrier, out: mp.Queue) -> None:
    store = LeaseStore(url, INVENTORY)
    rng = random.Random(seed)
    owner = Owner(host="stress", pid=os.getpid())
    barrier.wait()
    granted = attempts = 0
    while granted < PER_PROCESS:
        attempts += 1
        allocation = store.try_acquire(rng.choice(REQUESTS), owner)
        if allocation is None:
            time.sleep(rng.uniform(0.0005, 0.004))
            continue
        store.release(allocation.lease_id)
        granted += 1
    store.close()
    out.put((granted, attempts))


def mixed_worker(url: str, seed: int, barrier: mp.synchronize.Barrier, out: mp.Queue) -> None:
    store = LeaseStore(url, INVENTORY)
    rng = random.Random(seed)
    owner = Owner(host="stress", pid=os.getpid())
    barrier.wait()
    granted = 0
    while granted < MIXED_PER_PROCESS:
        how, request = rng.choice(MIXED)
        if how == "queue":
            try:
                allocation = store.acquire(request, owner, timeout_s=0.3, poll_s=0.02)
            except PoolTimeoutError:
                continue
        else:
            allocation = store.try_acquire(request, owner)
        if allocation is None:
            time.sleep(rng.uniform(0.002, 0.01))
            continue
        time.sleep(rng.uniform(0, 0.002))
        store.release(allocation.lease_id)
        granted += 1
    store.close()
    out.put((granted, 0))


def replay(events: list[AuditEvent], team_of: dict[str, str] | None = None) -> int:
    """Check the history's device bookkeeping (and team ``capped``'s GPU quota, given each lease's team);
    return the number of grants."""
    holder: dict[tuple[str, str, str], str] = {}
    memory: dict[str, int] = defaultdict(int)
    capped = grants = 0
    for e in events:
        keys = [(node, kind, str(d)) for node, dev in e.devices.items() for kind in ("gpus", "cpus")
                for d in dev[kind]]
        gpus = sum(len(dev["gpus"]) for dev in e.devices.values())
        is_capped = team_of is not None and team_of[e.lease_id] == "capped"
        if e.event == "grant":
            grants += 1
            for key in keys:
                assert key not in holder, f"event {e.id}: {key} granted to {e.lease_id} while {holder[key]} held it"
                holder[key] = e.lease_id
            for node, dev in e.devices.items():
                memory[node] += dev["memory"]
                assert memory[node] <= NODE_MEMORY, f"event {e.id}: {node} memory over-committed"
            capped += gpus if is_capped else 0
            assert capped <= CAPPED_GPUS, f"event {e.id}: team capped holds {capped} GPUs, over its quota"
        elif e.event in ("release", "expire"):
            for key in keys:
                assert holder.pop(key, None) == e.lease_id, f"event {e.id}: {e.lease_id} freed {key} it did not hold"
            for node, dev in e.devices.items():
                memory[node] -= dev["memory"]
            capped -= gpus if is_capped else 0
    assert holder == {}, f"devices still held at the end: {holder}"
    return grants


def run_workers(url: str, target: Callable[..., None]) -> list[tuple[int, int]]:
    """Start PROCESSES ``target(url, seed, barrier, out)`` on fresh tables; return what each put on ``out``."""
    engine = sa.create_engine(url)
    metadata.drop_all(engine)  # the session's PostgreSQL database may hold other tests' leases
    engine.dispose()
    LeaseStore(url, INVENTORY).close()  # the schema exists before the workers start; no connection crosses fork
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [ctx.Process(target=target, args=(url, seed, barrier, out)) for seed in range(PROCESSES)]
    for p in procs:
        p.start()
    results = [out.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return results


def check_history(url: str, granted: int) -> dict[str, int]:
    """Replay the pool's history; check nothing is left held or queued; return the lease count per state."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        team_of = dict(conn.execute(sa.text("SELECT id, team FROM kiln_leases")).all())
    with LeaseStore(url, INVENTORY) as store:
        assert replay(store.history("scarce"), team_of) == granted
        assert store.leases() == []
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM kiln_lease_devices")).scalar() == 0
        states = dict(conn.execute(sa.text("SELECT state, count(*) FROM kiln_leases GROUP BY state")).all())
    engine.dispose()
    return states


def stress(url: str) -> None:
    started = time.monotonic()
    results = run_workers(url, worker)
    granted, attempts = sum(r[0] for r in results), sum(r[1] for r in results)
    print(f"{granted} grants of {attempts} attempts by {PROCESSES} processes in {time.monotonic() - started:.1f}s")
    assert granted >= CYCLES
    assert check_history(url, granted) == {"released": granted}


def test_no_double_grant_under_contention_sqlite(tmp_path) -> None:
    stress(f"sqlite:///{tmp_path / 'pools.db'}")


@pytest.mark.postgres
def test_no_double_grant_under_contention_postgres(postgres_url: str) -> None:
    stress(postgres_url)


@pytest.mark.postgres
def test_mixed_grants_race_without_double_grant_or_quota_overrun_postgres(postgres_url: str) -> None:
    started = time.monotonic()
    granted = sum(r[0] for r in run_workers(postgres_url, mixed_worker))
    print(f"{granted} grants by {PROCESSES} processes in {time.monotonic() - started:.1f}s")
    assert granted == PROCESSES * MIXED_PER_PROCESS
    states = check_history(postgres_url, granted)
    assert states.pop("released") == granted and set(states) <= {"cancelled"}  # queue entries that timed out
