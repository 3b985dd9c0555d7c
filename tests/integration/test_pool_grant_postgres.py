"""The PostgreSQL fast grant path against the races it must win or refuse (see ``kiln.tasks.pools.grant``).

Each race is staged with the pool's own lock: a test connection holds it while the racing requests read the pool
and then queue on the lock, so each reads a pool the other is about to change; releasing the lock lets them run
in the order they queued.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from kiln.tasks.pools import sql
from kiln.tasks.pools.allocation import LeaseRequest, Owner
from kiln.tasks.pools.inventory import GpuDevice, Inventory, Node, Pool, Team
from kiln.tasks.pools.store import LeaseStore
from kiln.tasks.pools.tables import metadata

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

GiB = 1024**3
OWNER = Owner(host="race", pid=1)
INVENTORY = Inventory(
    pools={"gpu": Pool("gpu", tuple(Node(name, name, None, (0, 1, 2, 3), 16 * GiB,
                                         (GpuDevice("0", 0, None, 24 * GiB), GpuDevice("1", 1, None, 24 * GiB)))
                                    for name in ("node-a", "node-b")), "pack")},
    teams={"default": Team("default"), "capped": Team("capped", quota_gpus=2)}, source="race test")


def req(**kw: Any) -> LeaseRequest:
    return LeaseRequest(**{"pool": "gpu", **kw})


@pytest.fixture
def url(postgres_url: str) -> str:
    engine = sa.create_engine(postgres_url)
    metadata.drop_all(engine)
    engine.dispose()
    return postgres_url


@pytest.fixture
def stores(url: str) -> Iterator[list[LeaseStore]]:
    opened = [LeaseStore(url, INVENTORY) for _ in range(3)]
    yield opened
    for s in opened:
        s.close()


def waiting_for_pool_lock(conn: sa.Connection) -> int:
    return conn.execute(sa.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND "
                                "database = (SELECT oid FROM pg_database WHERE datname = current_database())")
                        ).scalar()


def race(url: str, calls: list[Callable[[], Any]]) -> list[Any]:
    """Run ``calls`` in threads, started one by one while the pool lock is held, each once the ones before it
    wait for that lock; then release it. Returns their results in order."""
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # noqa: BLE001  (re-raised in the test thread below)
            errors.append(exc)

    engine = sa.create_engine(url)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    with engine.connect() as holder, engine.connect() as watcher:
        holder.execute(sa.text(sql.LOCK_POOL.sql), {"pool": "gpu"})  # held until the transaction ends
        for i, thread in enumerate(threads):
            thread.start()
            deadline = time.monotonic() + 10
            while waiting_for_pool_lock(watcher) < i + 1 and not errors:
                assert time.monotonic() < deadline, "the racing request never queued on the pool lock"
                time.sleep(0.005)
            watcher.rollback()  # a fresh snapshot of pg_locks next time
        holder.commit()
    for thread in threads:
        thread.join(timeout=30)
    engine.dispose()
    if errors:
        raise errors[0]
    return results


RACES = [
    ("same-gpu", req(gpus=1), req(gpus=1), [("node-a", ("0",)), ("node-a", ("1",))]),
    ("node-memory", req(gpus=1, memory=10 * GiB), req(cpus=1, memory=10 * GiB), [("node-a", ("0",)), ("node-b", ())]),
]


@pytest.mark.parametrize(("first", "second", "expected"), [r[1:] for r in RACES], ids=[r[0] for r in RACES])
def test_two_fast_grants_that_read_the_same_pool_never_share_a_device_or_overcommit(
        url: str, stores: list[LeaseStore], first: LeaseRequest, second: LeaseRequest, expected: list) -> None:
    a, b, _ = stores
    got = race(url, [lambda: a.try_acquire(first, OWNER), lambda: b.try_acquire(second, OWNER)])
    assert [(g.master.node, g.master.gpus) for g in got] == expected  # the second took its next alternative
    assert (a.fast_grants, b.fast_grants) == (1, 1)
    held = [(n.node, "gpu", d) for g in got for n in g.nodes for d in n.gpus]
    assert len(held) == len(set(held))
    history = a.history("gpu")
    assert [(e.event, e.lease_id) for e in history] == [("grant", got[0].lease_id), ("grant", got[1].lease_id)]


def test_a_fast_grant_never_passes_a_waiter_queued_after_it_read_the_pool(url: str, stores: list[LeaseStore]) -> None:
    queue, newcomer, _ = stores
    blocker = queue.try_acquire(req(gpus=2, nodes=2), OWNER)  # the pool is full: the first request must queue
    assert blocker is not None
    queue.release(blocker.lease_id)  # free again, but the waiter is about to be queued
    waiter, got = race(url, [lambda: queue.enqueue(req(gpus=1), OWNER), lambda: newcomer.try_acquire(req(gpus=1),
                                                                                                      OWNER)])
    assert got is None and newcomer.fast_grants == 0  # it read an empty queue, then found the waiter under the lock
    assert queue.try_grant(waiter) is not None


def test_only_single_node_requests_of_teams_without_quota_take_the_fast_path(stores: list[LeaseStore]) -> None:
    store = stores[0]
    single = store.try_acquire(req(gpus=1), OWNER)
    gang = store.try_acquire(req(gpus=1, nodes=2), OWNER)
    capped = store.try_acquire(req(cpus=1, team="capped"), OWNER)
    assert single and gang and capped and store.fast_grants == 1
    waiter = store.enqueue(req(gpus=2, nodes=2), OWNER)
    assert store.try_acquire(req(cpus=1), OWNER) is None and store.fast_grants == 1  # a waiter is ahead
    assert store.try_acquire(req(cpus=1, priority=5), OWNER) is not None and store.fast_grants == 2  # it is not
    store.release(waiter)
