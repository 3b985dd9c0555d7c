"""Preemption in the lease store (SQLite here; ``tests/integration/test_pool_store_postgres.py`` runs these cases on
PostgreSQL too): which lease is asked to give way and when, the audit history of it, the revoke at the grace
deadline, a keep-alive that tells the holder, and borrowing beyond a team's quota."""

# The store cases' fixtures are imported by name, and each test takes them as parameters of the same names.
# ruff: noqa: F811
from __future__ import annotations

import threading

import pytest
from pool_audit import replay
from test_pool_store import INVENTORY, OWNER, Clock, clock, req, store, url  # noqa: F401 (fixtures)

from kiln.tasks.pools.allocation import LeaseLostError, Owner
from kiln.tasks.pools.keepalive import KeepAlive
from kiln.tasks.pools.store import LeaseStore

TRIAL = Owner(dag_id="tuned", run_id="manual__1", task_id="trial", try_number=1, host="w2", pid=7)


def trial_req(**kw: object):
    return req(gpus=2, priority=-1, preemptible=True, grace_s=30, **kw)


def fill_with_trials(store: LeaseStore, clock: Clock) -> tuple[str, str]:
    """Both nodes taken by preemptible trials, the second granted later."""
    old = store.try_acquire(trial_req(), TRIAL)
    clock.now += 5
    young = store.try_acquire(trial_req(), TRIAL)
    assert old is not None and young is not None
    return old.lease_id, young.lease_id


def test_a_higher_priority_request_preempts_the_youngest_trial_and_gets_its_devices(store: LeaseStore,
                                                                                     clock: Clock) -> None:
    old, young = fill_with_trials(store, clock)
    assert store.try_acquire(req(gpus=2), OWNER) is None
    waiting = store.enqueue(req(gpus=2), OWNER)
    assert store.try_grant(waiting) is None  # it waits for the victim to checkpoint
    notice = store.preemption(young)
    assert notice is not None and notice.by_lease == waiting and notice.deadline == clock.now + 30
    assert store.preemption(old) is None
    assert store.try_grant(waiting) is None and store.preemption(old) is None  # one victim is enough
    preempt = [e for e in store.history("gpu") if e.event == "preempt"]
    assert [e.lease_id for e in preempt] == [young]
    assert waiting in preempt[0].detail and OWNER.label() in preempt[0].detail
    assert store.release(young, reason="preempted")
    granted = store.try_grant(waiting)
    assert granted is not None and granted.master.node == store.lease(young).allocation.master.node
    assert replay(store.history("gpu"))[1] == set()


@pytest.mark.parametrize("blocker", [
    {"priority": -1},  # the same priority gives no right to preempt
    {"preemptible": False},
], ids=["same-priority", "not-preemptible"])
def test_no_preemption_without_a_lower_priority_preemptible_lease(store: LeaseStore, clock: Clock,
                                                                  blocker: dict) -> None:
    held = store.try_acquire(req(nodes=2, gpus=2, **{"priority": -5, "preemptible": True, **blocker}), TRIAL)
    assert held is not None
    waiting = store.enqueue(req(gpus=2, priority=-1), OWNER)
    assert store.try_grant(waiting) is None and store.preemption(held.lease_id) is None
    assert [e.event for e in store.history("gpu")].count("preempt") == 0


def test_no_preemption_when_it_would_not_make_the_request_fit(store: LeaseStore) -> None:
    fixed = store.try_acquire(req(gpus=1), OWNER)  # node-a, not preemptible
    soft = store.try_acquire(trial_req(), TRIAL)  # node-b
    assert fixed is not None and soft is not None
    waiting = store.enqueue(req(nodes=2, gpus=2), OWNER)  # needs node-a whole too
    assert store.try_grant(waiting) is None and store.preemption(soft.lease_id) is None


def test_a_victim_that_holds_on_past_its_grace_period_is_revoked(store: LeaseStore, clock: Clock) -> None:
    _, young = fill_with_trials(store, clock)
    waiting = store.enqueue(req(gpus=2), OWNER)
    assert store.try_grant(waiting) is None
    clock.now += 29
    store.heartbeat(young)  # still its lease within the grace period
    assert store.try_grant(waiting) is None
    clock.now += 2
    granted = store.try_grant(waiting)
    assert granted is not None
    assert store.lease(young).state == "revoked"
    with pytest.raises(LeaseLostError, match="revoked"):
        store.heartbeat(young)
    revoke = [e for e in store.history("gpu") if e.event == "revoke"]
    assert [e.lease_id for e in revoke] == [young] and waiting in revoke[0].detail
    assert store.release(young) is False  # the late holder's release changes nothing
    assert replay(store.history("gpu"))[1] == set()


def test_keepalive_tells_the_holder_once(store: LeaseStore, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kiln.tasks.pools.keepalive.PREEMPT_POLL_S", 0.05)
    _, young = fill_with_trials(store, clock)
    told: list = []
    done = threading.Event()
    keep = KeepAlive(store, young, 60, on_preempted=lambda p: (told.append(p), done.set()))
    try:
        waiting = store.enqueue(req(gpus=2), OWNER)
        store.try_grant(waiting)
        assert done.wait(10)
        assert keep.preempted.is_set() and not keep.lost.is_set()
        assert keep.preemption is not None and keep.preemption.by_lease == waiting
        store.try_grant(waiting)
        threading.Event().wait(0.3)
        assert len(told) == 1
    finally:
        keep.stop()


def test_a_team_borrows_beyond_its_quota_only_preemptibly_and_gives_it_back_to_other_teams(
        store: LeaseStore, clock: Clock) -> None:
    small = {"team": "small", "gpus": 2}  # its quota is 2 GPUs
    within = store.try_acquire(req(**small), OWNER)
    assert within is not None
    assert store.try_acquire(req(**small), OWNER) is None  # over the quota, not preemptible: no
    clock.now += 1
    borrowed = store.try_acquire(req(**small, preemptible=True), TRIAL)
    assert borrowed is not None  # the free node, borrowed
    # Another team of the same priority takes the borrowed devices back; the lease within the quota is kept.
    waiting = store.enqueue(req(gpus=2), OWNER)
    assert store.try_grant(waiting) is None
    assert store.preemption(borrowed.lease_id) is not None and store.preemption(within.lease_id) is None
    store.release(borrowed.lease_id, reason="preempted")
    assert store.try_grant(waiting) is not None
    assert replay(store.history("gpu"))[1] == set()
