"""The champion lock: one holder per model on the embedded SQLite lease store and on PostgreSQL, re-entrant by
holder, fenced by token, and let go by a killed holder when its row expires."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kiln.tasks.pipeline.champion_lock import ChampionLockError, ChampionLockLostError, ChampionLocks

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'pools.db'}"
    return request.getfixturevalue("postgres_url")


def test_one_holder_reentrant_and_fenced(db_url: str) -> None:
    now = [1000.0]
    locks = ChampionLocks(db_url, clock=lambda: now[0])
    model = f"m{time.monotonic_ns()}"
    a = locks.try_acquire(model, "run-a", ttl_s=10)
    assert a is not None
    assert locks.try_acquire(model, "run-b", ttl_s=10) is None
    with pytest.raises(ChampionLockError, match="run-a"):
        locks.acquire(model, "run-b", timeout_s=0.3, poll_s=0.1)
    again = locks.try_acquire(model, "run-a", ttl_s=10)  # a retried step of the same run
    assert again is not None and again.token != a.token
    with pytest.raises(ChampionLockLostError):
        locks.renew(model, "run-a", a.token)  # the old token is fenced out
    locks.renew(model, "run-a", again.token, ttl_s=10)

    now[0] += 11  # run-a stopped renewing: its row expires and run-b takes over
    b = locks.try_acquire(model, "run-b", ttl_s=10)
    assert b is not None
    with pytest.raises(ChampionLockLostError, match="held by run-b"):
        locks.renew(model, "run-a", again.token)
    assert not locks.release(model, again.token)  # a late release of run-a does not free run-b's lock
    assert locks.holder(model)["holder"] == "run-b"
    assert locks.release(model, b.token) and locks.holder(model) is None
    locks.close()


def test_threads_never_hold_it_together(db_url: str) -> None:
    model = f"m{time.monotonic_ns()}"
    inside, overlaps, waits = [0], [0], []
    guard = threading.Lock()

    def writer(i: int) -> None:
        locks = ChampionLocks(db_url)  # an engine each, as separate task processes have
        for j in range(3):
            grant = locks.acquire(model, f"run-{i}-{j}", timeout_s=60, poll_s=0.02)
            waits.append(grant.waited_s)
            with guard:
                inside[0] += 1
                overlaps[0] += inside[0] > 1
            time.sleep(0.02)
            with guard:
                inside[0] -= 1
            assert locks.release(model, grant.token)
        locks.close()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(waits) == 12 and overlaps[0] == 0
    print(f"\n12 acquisitions by 4 writers: max wait {max(waits):.2f} s")


HOLD = """
import sys, time
from kiln.tasks.pipeline.champion_lock import ChampionLocks
grant = ChampionLocks(sys.argv[1]).acquire(sys.argv[2], "killed-run", ttl_s=float(sys.argv[3]))
print("held", flush=True)
time.sleep(600)
"""


def test_a_killed_holder_lets_go_when_its_lock_expires(db_url: str) -> None:
    model = f"m{time.monotonic_ns()}"
    ttl = 3.0
    proc = subprocess.Popen([sys.executable, "-c", HOLD, db_url, model, str(ttl)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        locks = ChampionLocks(db_url)
        assert locks.holder(model)["holder"] == "killed-run"  # a DB row outlives its process...
        grant = locks.acquire(model, "next-run", timeout_s=30, poll_s=0.1)
        assert grant.waited_s <= ttl + 2  # ...until it expires; then the next writer takes it over
        assert locks.holder(model)["holder"] == "next-run"
        locks.close()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_lock_released_while_the_next_writer_looks_is_not_reported_taken_over(
        db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    model = f"m{time.monotonic_ns()}"
    locks = ChampionLocks(db_url)
    first = locks.acquire(model, "run-a")
    read = locks.holder

    def holder_then_release(name: str) -> dict | None:
        row = read(name)  # the next writer sees run-a's live lock...
        locks.release(name, first.token)  # ...which run-a releases before the writer's upsert
        return row

    locks.holder = holder_then_release  # type: ignore[method-assign]
    with caplog.at_level("WARNING", logger="kiln.tasks.pipeline.champion_lock"):
        assert locks.try_acquire(model, "run-b") is not None
    assert "took over" not in caplog.text
    locks.close()
