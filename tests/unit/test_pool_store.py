"""The lease store on SQLite: grants and releases, the queue (FIFO within priority), quotas, gangs, TTLs with an
injected clock, the audit trail, the snapshot and the CLI, and requests refused with a message."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from kiln.tasks.cli.main import main as kiln
from kiln.tasks.pools.allocation import LeaseLostError, LeaseRequest, Owner, PoolTimeoutError, UnsatisfiableRequestError
from kiln.tasks.pools.inventory import GpuDevice, Inventory, Node, Pool, Team
from kiln.tasks.pools.keepalive import KeepAlive, hold
from kiln.tasks.pools.leases import LeaseNotFoundError
from kiln.tasks.pools.store import LeaseStore

GiB = 1024**3
OWNER = Owner(dag_id="train_dag", run_id="manual__1", task_id="train", try_number=1, host="w1", pid=42)
INVENTORY_YAML = """
pools:
  gpu:
    nodes:
      - {name: node-a, address: 10.0.0.1, cpus: 4, memory: 16GiB, gpus: [{index: 0, memory: 24GiB},
                                                                          {index: 1, memory: 24GiB}]}
      - {name: node-b, address: 10.0.0.2, cpus: 4, memory: 16GiB, gpus: [{index: 0, memory: 24GiB},
                                                                          {index: 1, memory: 24GiB}]}
  wide:
    placement: spread
    nodes:
      - {name: w1, cpus: 2, memory: 4GiB}
      - {name: w2, cpus: 2, memory: 4GiB}
teams:
  default: {priority: 0}
  research: {priority: 10}
  small: {priority: 0, quota: {gpus: 2}}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def gpu_node(name: str, address: str) -> Node:
    return Node(name, address, None, (0, 1, 2, 3), 16 * GiB,
                (GpuDevice("0", 0, None, 24 * GiB), GpuDevice("1", 1, None, 24 * GiB)))


INVENTORY = Inventory(
    pools={"gpu": Pool("gpu", (gpu_node("node-a", "10.0.0.1"), gpu_node("node-b", "10.0.0.2")), "pack"),
           "wide": Pool("wide", (Node("w1", "w1", None, (0, 1), 4 * GiB), Node("w2", "w2", None, (0, 1), 4 * GiB)),
                        "spread")},
    teams={"default": Team("default"), "research": Team("research", 10), "small": Team("small", quota_gpus=2)},
    source="test inventory")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'pools.db'}"


@pytest.fixture
def store(url: str, clock: Clock) -> LeaseStore:
    with LeaseStore(url, INVENTORY, clock=clock) as s:
        yield s  # type: ignore[misc]


def req(**kw: object) -> LeaseRequest:
    return LeaseRequest(**{"pool": "gpu", **kw})  # type: ignore[arg-type]


def held(store: LeaseStore) -> dict[str, int]:
    return {n: v["gpus"]["used"] for n, v in store.snapshot()["pools"]["gpu"]["nodes"].items()}


def test_grant_then_release_is_idempotent(store: LeaseStore, clock: Clock) -> None:
    a = store.try_acquire(req(gpus=1, cpus=2, memory=GiB), OWNER)
    assert a is not None and a.pool == "gpu"
    assert (a.master.node, a.master.address, a.master.gpus, a.master.cpus, a.master.memory) == \
        ("node-a", "10.0.0.1", ("0",), (0, 1), GiB)
    record = store.lease(a.lease_id)
    assert (record.state, record.owner, record.allocation, record.team) == ("granted", OWNER, a, "default")
    assert record.granted_at == clock.now and record.expires_at == clock.now + 60
    assert store.release(a.lease_id) is True
    assert store.release(a.lease_id) is False
    assert store.release("no-such-lease") is False
    assert store.lease(a.lease_id).state == "released" and held(store) == {"node-a": 0, "node-b": 0}
    with pytest.raises(LeaseNotFoundError):
        store.lease("no-such-lease")


def test_gang_is_all_or_nothing_with_device_ids_per_node(store: LeaseStore) -> None:
    gang = store.try_acquire(req(nodes=2, gpus=2, cpus=4), OWNER)
    assert gang is not None
    assert [(n.node, n.gpus, n.cpus) for n in gang.nodes] == [("node-a", ("0", "1"), (0, 1, 2, 3)),
                                                              ("node-b", ("0", "1"), (0, 1, 2, 3))]
    store.release(gang.lease_id)
    one = store.try_acquire(req(gpus=1), OWNER)
    assert store.try_acquire(req(nodes=2, gpus=2), OWNER) is None
    assert held(store) == {"node-a": 1, "node-b": 0} and len(store.leases("gpu")) == 1  # nothing half-granted
    assert one is not None


def test_pack_fills_a_node_spread_alternates(store: LeaseStore) -> None:
    packed = [store.try_acquire(req(gpus=1), OWNER) for _ in range(2)]
    assert [a.master.node for a in packed if a] == ["node-a", "node-a"]
    spread = [store.try_acquire(LeaseRequest(pool="wide", cpus=1), OWNER) for _ in range(2)]
    assert [a.master.node for a in spread if a] == ["w1", "w2"]


def test_queue_is_fifo_within_priority_and_higher_priority_goes_first(store: LeaseStore) -> None:
    first, second = store.try_acquire(req(gpus=2), OWNER), store.try_acquire(req(gpus=2), OWNER)
    assert first and second
    w1 = store.enqueue(req(gpus=2), OWNER)
    w2 = store.enqueue(req(gpus=1), OWNER)
    w3 = store.enqueue(req(gpus=1, team="research"), OWNER)  # priority 10: ahead of both
    store.release(first.lease_id)
    assert store.try_grant(w2) is None and store.try_grant(w1) is None  # w3 first
    assert store.try_acquire(req(gpus=1), OWNER) is None  # a newcomer queues behind the waiters
    assert store.try_grant(w3) is not None
    assert store.try_grant(w1) is None and store.try_grant(w2) is None  # w1 needs 2 GPUs; w2 may not pass it
    store.release(second.lease_id)
    g1 = store.try_grant(w1)
    assert g1 is not None and g1.master.node == "node-b"
    assert store.try_grant(w2) is not None and store.try_grant(w1) == g1  # polling a granted entry is harmless
    assert store.snapshot()["pools"]["gpu"]["waiting"] == []


def test_higher_priority_newcomer_passes_the_queue(store: LeaseStore) -> None:
    store.try_acquire(req(gpus=2), OWNER)
    store.try_acquire(req(gpus=1), OWNER)
    store.enqueue(req(gpus=2), OWNER)
    assert store.try_acquire(req(gpus=1, team="research"), OWNER) is not None


def test_team_quota_makes_requests_wait_without_blocking_other_teams(store: LeaseStore) -> None:
    two = store.try_acquire(req(gpus=2, team="small"), OWNER)
    assert two is not None
    assert store.try_acquire(req(gpus=1, team="small"), OWNER) is None  # capacity is free; the quota is not
    waiter = store.enqueue(req(gpus=1, team="small"), OWNER)
    assert store.try_acquire(req(gpus=1), OWNER) is not None  # another team is not held up by small's quota
    assert store.try_grant(waiter) is None
    store.release(two.lease_id)
    assert store.try_grant(waiter) is not None
    with pytest.raises(UnsatisfiableRequestError, match="team 'small' may hold at most 2 GPU"):
        store.enqueue(req(gpus=2, nodes=2, team="small"), OWNER)


def test_ttl_expiry_frees_devices_without_a_reaper(store: LeaseStore, clock: Clock) -> None:
    gang = store.try_acquire(req(nodes=2, gpus=2, ttl_s=10), OWNER)
    assert gang is not None
    clock.now += 5
    store.heartbeat(gang.lease_id)  # now expires at +15
    clock.now += 9
    assert store.try_acquire(req(gpus=1), OWNER) is None
    clock.now += 2  # 1 s past its expiry: the next grant that does not fit reaps it
    assert store.try_acquire(req(gpus=1), OWNER) is not None
    assert store.lease(gang.lease_id).state == "expired"
    with pytest.raises(LeaseLostError, match="expired"):
        store.heartbeat(gang.lease_id)
    expire = [e for e in store.history("gpu") if e.event == "expire"]
    assert [e.lease_id for e in expire] == [gang.lease_id]
    assert expire[0].devices == {"node-a": {"gpus": ["0", "1"], "cpus": [], "memory": 0},
                                 "node-b": {"gpus": ["0", "1"], "cpus": [], "memory": 0}}


def test_reap_expires_granted_and_waiting_entries(store: LeaseStore, clock: Clock) -> None:
    a = store.try_acquire(req(nodes=2, gpus=2, ttl_s=5), OWNER)
    w = store.enqueue(req(gpus=1, ttl_s=5), OWNER)
    assert a is not None and store.reap() == []
    clock.now += 6
    assert sorted(store.reap()) == sorted([a.lease_id, w])
    assert held(store) == {"node-a": 0, "node-b": 0} and store.leases() == []


def test_a_waiter_that_stops_polling_expires_and_unblocks_the_queue(store: LeaseStore, clock: Clock) -> None:
    store.try_acquire(req(gpus=2), OWNER)
    store.try_acquire(req(gpus=1), OWNER)
    dead = store.enqueue(req(gpus=2, ttl_s=3), OWNER)
    alive = store.enqueue(req(gpus=1, ttl_s=30), OWNER)
    clock.now += 2
    assert store.try_grant(dead) is None  # polling heartbeats it
    clock.now += 2
    assert store.try_grant(alive) is None  # 'dead' is still live and ahead
    clock.now += 2
    assert store.try_grant(alive) is not None  # 'dead' was reaped on the way
    with pytest.raises(LeaseLostError, match="expired"):
        store.try_grant(dead)


def test_acquire_times_out_with_the_request_and_usage_and_leaves_nothing(store: LeaseStore) -> None:
    store.try_acquire(req(nodes=2, gpus=2), OWNER)
    with pytest.raises(PoolTimeoutError) as err:
        store.acquire(req(gpus=1), OWNER, timeout_s=0.2, poll_s=0.05)
    assert isinstance(err.value, TimeoutError)
    message = str(err.value)
    assert "no grant within 0.2s for 1 node(s) x {1 GPU(s)} from pool 'gpu'" in message
    assert "node-a 2/2 GPUs" in message and "1 lease(s) held" in message
    assert store.snapshot()["pools"]["gpu"]["waiting"] == []
    assert [e.event for e in store.history("gpu")][-2:] == ["request", "timeout"]


def test_acquire_waits_for_a_release_by_another_process(store: LeaseStore, url: str, clock: Clock) -> None:
    holder = store.try_acquire(req(nodes=2, gpus=2), OWNER)
    assert holder is not None

    def release_when_someone_waits() -> None:
        with LeaseStore(url, INVENTORY, clock=clock) as other:
            deadline = time.monotonic() + 10
            while not other.snapshot()["pools"]["gpu"]["waiting"] and time.monotonic() < deadline:
                time.sleep(0.01)
            other.release(holder.lease_id)

    thread = threading.Thread(target=release_when_someone_waits)
    thread.start()
    got = store.acquire(req(gpus=2), OWNER, timeout_s=10, poll_s=0.02)
    thread.join()
    assert got.master.gpus == ("0", "1")


def test_history_records_every_transition_in_order(store: LeaseStore, clock: Clock) -> None:
    a = store.try_acquire(req(gpus=2, cpus=1), OWNER)
    w = store.enqueue(req(nodes=2, gpus=2), OWNER)
    store.release(w, reason="changed my mind")
    assert a is not None
    store.release(a.lease_id)
    events = store.history("gpu")
    assert [(e.event, e.lease_id) for e in events] == [("grant", a.lease_id), ("request", w), ("cancel", w),
                                                       ("release", a.lease_id)]
    assert events[0].devices == {"node-a": {"gpus": ["0", "1"], "cpus": [0], "memory": 0}}
    assert events[2].detail == "changed my mind" and events[3].devices == events[0].devices
    assert [e.id for e in events] == sorted(e.id for e in events) and store.history("wide") == []
    assert [e.event for e in store.history(lease_id=w)] == ["request", "cancel"]


def test_snapshot_is_json_and_the_cli_prints_it(store: LeaseStore, url: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pools.yaml").write_text(INVENTORY_YAML)
    args = ["--db", url, "--inventory", str(tmp_path / "pools.yaml")]
    a = store.try_acquire(req(gpus=1, cpus=2, memory=GiB, team="research"), OWNER)
    w = store.enqueue(req(nodes=2, gpus=2), Owner(host="laptop", pid=7))
    assert a is not None
    assert kiln(['pools', *args, "status", "--json"]) == 0
    snap = json.loads(capsys.readouterr().out)
    gpu = snap["pools"]["gpu"]
    assert gpu["nodes"]["node-a"]["gpus"] == {"total": 2, "used": 1, "held": ["0"]}
    assert gpu["nodes"]["node-a"]["memory"] == {"total": 16 * GiB, "used": GiB}
    assert [x["id"] for x in gpu["waiting"]] == [w] and gpu["waiting"][0]["owner"] == "laptop:7"
    assert gpu["leases"][0]["owner"] == "train_dag/manual__1/train#1" and gpu["leases"][0]["nodes"][0]["cpus"] == "0,1"
    assert snap["teams"]["research"]["used"] == {"gpus": 1, "cpus": 2, "memory": GiB}
    assert kiln(['pools', *args, "status"]) == 0
    table = capsys.readouterr().out
    assert "pool gpu (placement pack)" in table and "train_dag/manual__1/train#1" in table and "waiting: 1" in table
    assert kiln(['pools', *args, "metrics"]) == 0
    metrics = capsys.readouterr().out
    assert 'kiln_pool_gpus_used{pool="gpu",node="node-a"} 1' in metrics
    assert 'kiln_pool_waiting{pool="gpu"} 1' in metrics and 'kiln_pool_leases{pool="wide"} 0' in metrics
    assert kiln(['pools', *args, "release", a.lease_id]) == 0 and kiln(['pools', *args, "release", a.lease_id]) == 1
    assert kiln(['pools', *args, "reap"]) == 0


BAD_REQUESTS = [
    ("zero-nodes", dict(nodes=0), ValueError, "nodes: must be at least 1, found 0"),
    ("negative-gpus", dict(gpus=-1), ValueError, "gpus: cannot be negative"),
    ("bad-placement", dict(placement="random"), ValueError, "placement: expected 'pack' or 'spread'"),
    ("zero-ttl", dict(ttl_s=0), ValueError, "ttl_s: must be positive"),
    ("unknown-pool", dict(pool="tpu"), UnsatisfiableRequestError, "pool 'tpu' does not exist; pools in test inventory: "
                                                                  "gpu, wide"),
    ("unknown-team", dict(team="ops"), UnsatisfiableRequestError, "team 'ops' does not exist"),
    ("too-many-gpus", dict(gpus=3), UnsatisfiableRequestError, "asks 3 GPU(s) per node but the largest node of pool "
                                                               "'gpu' has 2 (node-a)"),
    ("gpu-memory", dict(gpus=1, gpu_memory_min=32 * GiB), UnsatisfiableRequestError, "the largest has 24.0GiB"),
    ("too-wide", dict(nodes=3, gpus=1), UnsatisfiableRequestError, "needs 3 distinct node(s)"),
    ("over-quota", dict(gpus=2, nodes=2, team="small"), UnsatisfiableRequestError, "(its quota)"),
]


@pytest.mark.parametrize(("fields", "error", "message"), [b[1:] for b in BAD_REQUESTS],
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_fail_at_once_and_leave_nothing(store: LeaseStore, fields: dict, error: type,
                                                     message: str) -> None:
    with pytest.raises(error) as err:
        request = req(**fields)
        store.acquire(request, OWNER, timeout_s=5)
    assert message in str(err.value)
    assert store.leases() == [] and store.history() == []


def test_keepalive_heartbeats_and_reports_a_lost_lease(url: str) -> None:
    with LeaseStore(url, INVENTORY) as store:
        a = store.acquire(req(gpus=1, ttl_s=0.3), OWNER, timeout_s=5)
        first = store.lease(a.lease_id).expires_at
        called = threading.Event()
        keepalive = KeepAlive(store, a.lease_id, 0.3, on_lost=called.set)
        deadline = time.monotonic() + 5
        while store.lease(a.lease_id).expires_at == first and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.lease(a.lease_id).expires_at > first
        store.release(a.lease_id)  # as if an operator released it by hand
        assert keepalive.lost.wait(5)
        assert called.is_set()  # the holder was told, so it can stop using the devices
        keepalive.stop()
        keepalive.stop()


def test_hold_releases_on_exit_and_raises_when_the_lease_was_lost(url: str) -> None:
    with LeaseStore(url, INVENTORY) as store:
        with hold(store, req(gpus=2), OWNER, timeout_s=5) as allocation:
            assert store.lease(allocation.lease_id).state == "granted"
        assert store.lease(allocation.lease_id).state == "released"
        with pytest.raises(LeaseLostError, match="expired while it was held"):
            with hold(store, req(gpus=1, ttl_s=0.3), OWNER, timeout_s=5) as lost:
                store.release(lost.lease_id)
                # The keep-alive thread ends once a heartbeat finds the lease gone (within ttl/3).
                name = f"kiln-keepalive-{lost.lease_id[:8]}"
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and any(t.name == name for t in threading.enumerate()):
                    time.sleep(0.02)


def test_from_settings_uses_the_configured_file_and_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pools.yaml").write_text(INVENTORY_YAML)
    monkeypatch.setenv("KILN_POOLS_FILE", str(tmp_path / "pools.yaml"))
    monkeypatch.setenv("KILN_POOLS_DB_URL", f"sqlite:///{tmp_path / 'from-settings.db'}")
    with LeaseStore.from_settings() as store:
        assert set(store.inventory.pools) == {"gpu", "wide"} and store.url.endswith("from-settings.db")
        assert store.try_acquire(req(gpus=1), OWNER) is not None
    assert (tmp_path / "from-settings.db").exists()


def test_the_database_itself_refuses_a_device_held_twice(store: LeaseStore, url: str) -> None:
    a = store.try_acquire(req(gpus=1), OWNER)
    assert a is not None
    engine = sa.create_engine(url)
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO kiln_lease_devices (lease_id, pool, node, kind, device) "
                             "VALUES ('intruder', 'gpu', 'node-a', 'gpu', '0')"))
    engine.dispose()


def test_sqlite_store_creates_its_folder(tmp_path: Path) -> None:
    # The embedded default sits under KILN_HOME, which does not exist before a first run.
    store = LeaseStore(f"sqlite:///{tmp_path / 'new' / 'home' / 'pools.db'}", INVENTORY)
    try:
        assert store.try_acquire(req(gpus=1), Owner(host="h", pid=1)) is not None
    finally:
        store.close()
    assert (tmp_path / "new" / "home" / "pools.db").exists()


def test_a_first_connection_waits_for_another_process_writing_the_new_file(tmp_path: Path) -> None:
    # Switching a new file to WAL needs the write lock, and SQLite answers that pragma "database is locked" at once
    # instead of calling the busy handler: many tasks opening the embedded store together must wait, not fail.
    import sqlite3

    from kiln.tasks.pools.tables import make_engine

    path = tmp_path / "pools.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE theirs (x INTEGER)")
    commit = threading.Timer(0.5, lambda: other.execute("COMMIT"))
    commit.start()
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("SELECT count(*) FROM theirs").scalar() == 0
    finally:
        commit.join()
        engine.dispose()
        other.close()


def test_a_groups_cap_holds_its_requests_back_without_blocking_the_queue(store: LeaseStore) -> None:
    study = {"group": "penguins/run-1", "group_limit": 2, "gpus": 1}
    first, second = (store.try_acquire(req(**study), OWNER) for _ in range(2))
    assert first is not None and second is not None
    assert store.try_acquire(req(**study), OWNER) is None  # two GPUs are free, but the study is at its cap
    capped = store.enqueue(req(**study), OWNER)
    assert store.try_grant(capped) is None
    other = store.enqueue(req(gpus=1, group="penguins/run-2", group_limit=2), OWNER)
    assert store.try_grant(other) is not None  # queued after the capped one, not held up by it
    store.release(first.lease_id)
    assert store.try_grant(capped) is not None
    with pytest.raises(ValueError, match="group_limit"):
        req(gpus=1, group_limit=1)
