"""PooledOperator's lease protocol, driven directly (no scheduler): fail fast, run, defer, resume, kill, time out.

The pool's GPU entries are a stand-in (no GPU exists here); the lease store is real (SQLite in a temp folder).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

pytestmark = pytest.mark.integration

INVENTORY = {"pools": {"gpu": {"nodes": [{"name": "box", "cpus": 2, "memory": "8GiB",
                                          "gpus": [{"index": i, "memory": "24GiB"} for i in range(2)]}]}},
             "teams": {"default": {"priority": 0}, "small": {"priority": 0, "quota": {"gpus": 1}}}}


@pytest.fixture
def pool_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    inventory = tmp_path / "pools.yaml"
    inventory.write_text(yaml.safe_dump(INVENTORY))
    monkeypatch.setenv("KILN_POOLS_FILE", str(inventory))
    monkeypatch.setenv("KILN_POOLS_DB_URL", f"sqlite:///{tmp_path / 'pools.db'}")
    return tmp_path


def _context(task_id: str, try_number: int = 1) -> dict:
    return {"ti": SimpleNamespace(dag_id="d", run_id="r", task_id=task_id, try_number=try_number)}


def _op(task_id: str, code: str, **kwargs):
    from kiln.operators.command import PooledCommandOperator

    return PooledCommandOperator(task_id=task_id, command=[sys.executable, "-c", code], resource_pool="gpu",
                                 **kwargs)


def _store():
    from kiln.tasks.pools.store import LeaseStore

    return LeaseStore.from_settings()


def _live() -> list:
    store = _store()
    try:
        return store.leases()
    finally:
        store.close()


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({"gpus": 3}, ["3 GPU(s)", "2"]),
     ({"gpus": 1, "gpu_memory_min": "40GiB"}, ["40.0GiB", "24.0GiB"]),
     ({"gpus": 2, "team": "small"}, ["small", "quota"]),
     ({"gpus": 1, "team": "nobody"}, ["nobody", "default"])],
    ids=["more-gpus-than-the-pool", "no-gpu-big-enough", "over-team-quota", "unknown-team"])
def test_a_request_that_can_never_fit_fails_at_once(pool_env: Path, kwargs: dict, expected: list[str]) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException) as info:  # fails, not deferred: waiting cannot help
        _op("t", "pass", **kwargs).execute(_context("t"))
    for part in expected:
        assert part in str(info.value), str(info.value)
    assert _live() == []


def test_unknown_pool_fails_at_once(pool_env: Path) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from kiln.operators.command import PooledCommandOperator

    op = PooledCommandOperator(task_id="t", command=["true"], resource_pool="tpu", gpus=1)
    with pytest.raises(AirflowFailException, match=r"(?s)tpu.*gpu"):
        op.execute(_context("t"))


def test_runs_on_leased_gpus_then_releases(pool_env: Path, capfd: pytest.CaptureFixture) -> None:
    code = "import os; print('GPUS=' + os.environ['CUDA_VISIBLE_DEVICES'], 'LEASE=' + os.environ['KILN_LEASE_ID'])"
    assert _op("t", code, gpus=2).execute(_context("t")) == 0
    assert _live() == []
    store = _store()
    try:
        events = [e.event for e in store.history("gpu")]
    finally:
        store.close()
    assert events[-2:] == ["grant", "release"]


def test_waits_deferred_then_resumes_on_the_granted_lease(pool_env: Path) -> None:
    from airflow.sdk.exceptions import TaskDeferred

    from kiln.tasks.pools.allocation import LeaseRequest, Owner

    store = _store()
    blocker = store.try_acquire(LeaseRequest(pool="gpu", gpus=2), Owner(host="test", pid=1))
    assert blocker is not None
    op = _op("waiter", "import os; assert os.environ['CUDA_VISIBLE_DEVICES'] == '0'", gpus=1, wait_timeout_s=60)
    op.grant_settle_s = 3.0
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(_context("waiter"))
    trigger = deferred.value.trigger
    assert type(trigger).__name__ == "PoolLeaseTrigger"
    [waiting] = [lease for lease in store.leases() if lease.state == "waiting"]
    assert waiting.owner.task_id == "waiter"

    threading.Timer(1.0, store.release, args=(blocker.lease_id,)).start()
    started = time.monotonic()
    event = asyncio.run(_first_event(trigger))
    assert event["status"] == "granted"
    # Granted after 1 s, handed over once 3 s have passed since the deferral (Airflow's defer-exit race).
    assert time.monotonic() - started >= 2.9
    assert op.execute_granted(_context("waiter"), event) == 0
    assert _live() == []
    store.close()


def test_wait_timeout_cancels_the_queued_request(pool_env: Path) -> None:
    from kiln.operators.pools import PoolLeaseTrigger
    from kiln.tasks.pools.allocation import LeaseRequest, Owner

    store = _store()
    store.try_acquire(LeaseRequest(pool="gpu", gpus=2), Owner(host="test", pid=1))
    lease_id = store.enqueue(LeaseRequest(pool="gpu", gpus=1), Owner(host="test", pid=2))
    event = asyncio.run(_first_event(PoolLeaseTrigger(lease_id=lease_id, deadline=time.time() + 1.5, poll_s=0.2)))
    assert event["status"] == "timeout"
    assert store.lease(lease_id).state not in ("waiting", "granted")
    with pytest.raises(Exception, match="not granted"):
        _op("t", "pass", gpus=1).execute_granted(_context("t"), event)
    store.close()


def test_on_kill_stops_the_command_and_releases_the_lease(pool_env: Path) -> None:
    op = _op("t", "import time; print('started', flush=True); time.sleep(600)", gpus=1)
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            op.execute(_context("t"))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 30
    while op._proc is None or not _live():
        assert time.monotonic() < deadline, "the command never started"
        time.sleep(0.1)
    op.on_kill()
    op.on_kill()  # Airflow may call it twice
    worker.join(30)
    assert not worker.is_alive()
    assert "error" in outcome  # killed work fails the task (-9 exit)
    assert _live() == []


async def _first_event(trigger) -> dict:
    async for event in trigger.run():
        return event.payload
    raise AssertionError("trigger ended without an event")


def _preempt_from_another_thread(op, task_id: str, code_started: Path) -> tuple[dict, str]:
    """Run ``op`` on a thread until its command has started, then run a task of higher priority that needs the whole
    pool: it preempts ``op``'s lease and waits in its worker (it does not defer) until the devices are given back.
    Returns ``op``'s outcome and the preempting lease's id."""
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            op.execute(_context(task_id))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 30
    while not code_started.exists():
        assert time.monotonic() < deadline, "the command never started"
        time.sleep(0.05)
    urgent = _op("urgent", "import os; print(os.environ['KILN_LEASE_ID'])", gpus=2, priority=10)
    assert urgent.execute(_context("urgent")) == 0  # no TaskDeferred: granted in its worker
    worker.join(30)
    assert not worker.is_alive()
    store = _store()
    try:
        [lease] = [e.lease_id for e in store.history("gpu") if e.event == "grant"
                   and store.lease(e.lease_id).owner.task_id == "urgent"]
    finally:
        store.close()
    return outcome, lease


def test_a_preempted_command_checkpoints_gives_its_devices_back_and_resumes_when_granted_again(
        pool_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk.exceptions import TaskDeferred

    monkeypatch.setattr("kiln.tasks.pools.keepalive.PREEMPT_POLL_S", 0.1)
    started, saved = pool_env / "started", pool_env / "checkpoint"
    # Resumes from its checkpoint when there is one; on SIGTERM saves one and exits 75.
    code = (f"import pathlib, signal, sys, time\nsaved = pathlib.Path({str(saved)!r})\n"
            "if saved.exists(): print('resumed from', saved.read_text()); sys.exit(0)\n"
            "def stop(*_): saved.write_text('step 3'); sys.exit(75)\n"
            f"signal.signal(signal.SIGTERM, stop)\npathlib.Path({str(started)!r}).touch()\ntime.sleep(600)\n")
    op = _op("trial", code, gpus=1, priority=-1, preemptible=True, preempt_grace_s=30)
    op.grant_settle_s = 0.0
    began = time.monotonic()
    outcome, urgent = _preempt_from_another_thread(op, "trial", started)
    assert time.monotonic() - began < 15  # granted within seconds, not at the grace deadline
    deferred = outcome.get("error")
    assert isinstance(deferred, TaskDeferred), outcome  # queued again, holding no worker
    assert saved.read_text() == "step 3"
    store = _store()
    [first] = [e for e in store.history("gpu") if e.event == "preempt"]
    assert urgent in first.detail
    released = [e for e in store.history(lease_id=first.lease_id) if e.event == "release"]
    assert released and urgent in released[0].detail
    [queued] = [lease for lease in store.leases() if lease.state == "waiting"]
    assert queued.owner.task_id == "trial" and queued.request.preemptible
    event = asyncio.run(_first_event(deferred.trigger))
    assert event["status"] == "granted"
    assert op.execute_granted(_context("trial"), event) == 0
    assert _live() == []
    store.close()


def test_a_preempted_command_that_ignores_sigterm_is_killed_at_its_grace_deadline(
        pool_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk.exceptions import TaskDeferred

    monkeypatch.setattr("kiln.tasks.pools.keepalive.PREEMPT_POLL_S", 0.1)
    started = pool_env / "started"
    code = (f"import pathlib, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            f"pathlib.Path({str(started)!r}).touch()\ntime.sleep(600)\n")
    # 3 s of grace: 1 s for the command (2 s are kept for the release), then SIGKILL.
    op = _op("stubborn", code, gpus=2, priority=-1, preemptible=True, preempt_grace_s=3)
    began = time.monotonic()
    outcome, _ = _preempt_from_another_thread(op, "stubborn", started)
    assert time.monotonic() - began < 20
    assert isinstance(outcome.get("error"), TaskDeferred), outcome
    store = _store()
    ended = [e.event for e in store.history("gpu") if e.event in ("release", "revoke")]
    assert ended[0] == "release"  # killed and given back by its task before the deadline, not revoked
    store.close()
