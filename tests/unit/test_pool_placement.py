"""Placement: which concrete devices a request gets (pack vs spread, GPU memory, gangs), and requests that can
never fit, each refused with a message saying what was asked and what exists."""

from __future__ import annotations

import pytest

from kiln.tasks.pools.allocation import Allocation, LeaseRequest, NodeAllocation, UnsatisfiableRequestError
from kiln.tasks.pools.inventory import GpuDevice, Inventory, Node, Pool, Team
from kiln.tasks.pools.placement import NodeUsage, UsageTracker, check_satisfiable, place, usage_of

GiB = 1024**3


def node(name: str, gpus: int = 4, cpus: int = 8, memory: int = 64 * GiB, gpu_memory: tuple[int, ...] = ()) -> Node:
    mems = gpu_memory or (80 * GiB,) * gpus
    return Node(name=name, address=f"{name}.lan", docker_url=f"tcp://{name}:2376", cpus=tuple(range(cpus)),
                memory=memory, gpus=tuple(GpuDevice(f"{name}-g{i}", i, None, m) for i, m in enumerate(mems)))


def pool(*nodes: Node, placement: str = "pack") -> Pool:
    return Pool("p", nodes, placement)  # type: ignore[arg-type]


def used(gpus: set[str] = frozenset(), cpus: set[int] = frozenset(), memory: int = 0) -> NodeUsage:  # type: ignore[assignment]
    return NodeUsage(frozenset(gpus), frozenset(cpus), memory)


def test_grant_names_concrete_devices_and_the_node_endpoints() -> None:
    got = place(pool(node("a")), {}, LeaseRequest(pool="p", gpus=2, cpus=3, memory=GiB))
    assert got == (NodeAllocation(node="a", address="a.lan", docker_url="tcp://a:2376", gpus=("a-g0", "a-g1"),
                                  cpus=(0, 1, 2), memory=GiB),)


def test_pack_fills_the_busiest_node_that_fits_and_keeps_idle_nodes_whole() -> None:
    p = pool(node("a"), node("b"), node("c"))
    usage = {"b": used({"b-g0", "b-g1"}, {0, 1}), "c": used({"c-g0"}, {0})}
    got = place(p, usage, LeaseRequest(pool="p", gpus=1, cpus=1))
    assert got is not None and got[0].node == "b" and got[0].gpus == ("b-g2",) and got[0].cpus == (2,)
    # Two GPUs no longer fit best on b (2 free, leaving 0) ... which is still the best fit.
    assert place(p, usage, LeaseRequest(pool="p", gpus=2))[0].node == "b"  # type: ignore[index]
    # Three fit only on c and a; c (busier) is chosen, a stays whole for a 4-GPU job.
    assert place(p, usage, LeaseRequest(pool="p", gpus=3))[0].node == "c"  # type: ignore[index]


def test_spread_prefers_the_least_used_node_and_the_request_can_override_the_pool() -> None:
    p = pool(node("a"), node("b"), placement="spread")
    usage = {"a": used({"a-g0"})}
    assert place(p, usage, LeaseRequest(pool="p", gpus=1))[0].node == "b"  # type: ignore[index]
    assert place(p, usage, LeaseRequest(pool="p", gpus=1, placement="pack"))[0].node == "a"  # type: ignore[index]


def test_gpu_memory_min_picks_the_smallest_sufficient_gpus() -> None:
    a = node("a", gpu_memory=(16 * GiB, 80 * GiB, 40 * GiB, 40 * GiB))
    got = place(pool(a), {}, LeaseRequest(pool="p", gpus=2, gpu_memory_min=24 * GiB))
    assert got is not None and got[0].gpus == ("a-g2", "a-g3")  # the 80 GiB one stays free
    assert place(pool(a), {"a": used({"a-g1"})}, LeaseRequest(pool="p", gpus=3, gpu_memory_min=24 * GiB)) is None


def test_gang_takes_distinct_nodes_all_or_nothing() -> None:
    p = pool(node("a"), node("b"), node("c"))
    got = place(p, {"c": used({"c-g0"})}, LeaseRequest(pool="p", nodes=2, gpus=4))
    assert got is not None and [n.node for n in got] == ["a", "b"] and all(len(n.gpus) == 4 for n in got)
    assert place(p, {"c": used({"c-g0"}), "a": used({"a-g3"})}, LeaseRequest(pool="p", nodes=2, gpus=4)) is None


@pytest.mark.parametrize(("usage", "request_"), [
    ({"a": used(memory=63 * GiB)}, LeaseRequest(pool="p", memory=2 * GiB)),
    ({"a": used(cpus=set(range(7)))}, LeaseRequest(pool="p", cpus=2)),
    ({"a": used({"a-g0", "a-g1", "a-g2"})}, LeaseRequest(pool="p", gpus=2)),
], ids=["memory", "cpus", "gpus"])
def test_does_not_fit_now(usage: dict[str, NodeUsage], request_: LeaseRequest) -> None:
    assert place(pool(node("a")), usage, request_) is None


def test_deterministic_with_ties_broken_by_node_name() -> None:
    p = pool(node("b"), node("a"))
    first = place(p, {}, LeaseRequest(pool="p", gpus=1))
    assert first == place(p, {}, LeaseRequest(pool="p", gpus=1)) and first[0].node == "a"  # type: ignore[index]


def test_usage_tracker_matches_a_full_recount() -> None:
    a1 = Allocation("l1", "p", (NodeAllocation("a", gpus=("a-g0",), cpus=(0, 1), memory=GiB),))
    a2 = Allocation("l2", "p", (NodeAllocation("a", gpus=("a-g1",), cpus=(2,), memory=2 * GiB),
                                NodeAllocation("b", gpus=("b-g0",), memory=GiB)))
    a3 = Allocation("l3", "p", (NodeAllocation("b", cpus=(5,), memory=3),))
    tracker = UsageTracker()
    for held in ({"l1": a1, "l2": a2}, {"l2": a2, "l3": a3}, {}, {"l1": a1, "l3": a3}):
        got = tracker.update(held)
        want = usage_of(held.values())
        assert {k: (set(v.gpus), set(v.cpus), v.memory) for k, v in got.items() if v.gpus or v.cpus or v.memory} == \
            {k: (set(v.gpus), set(v.cpus), v.memory) for k, v in want.items() if v.gpus or v.cpus or v.memory}


INVENTORY = Inventory(
    pools={"p": pool(node("a", gpu_memory=(24 * GiB, 48 * GiB)), node("b", gpus=4, cpus=16)),
           "cpu": Pool("cpu", (node("c", gpus=0),), "spread")},
    teams={"default": Team("default"), "small": Team("small", quota_gpus=2, quota_cpus=8, quota_memory=8 * GiB)},
    source="pools.yaml")

UNSATISFIABLE = [
    ("unknown-pool", LeaseRequest(pool="gpus", gpus=1), ["pool 'gpus' does not exist", "pools in pools.yaml: cpu, p"]),
    ("unknown-team", LeaseRequest(pool="p", team="ml"), ["team 'ml' does not exist", "default, small"]),
    ("gpus-per-node", LeaseRequest(pool="p", gpus=5), ["asks 5 GPU(s) per node", "largest node of pool 'p' has 4 (b)"]),
    ("cpus-per-node", LeaseRequest(pool="p", cpus=17), ["asks 17 CPU(s) per node", "has 16 (b)"]),
    ("memory-per-node", LeaseRequest(pool="p", memory=65 * GiB), ["asks 65.0GiB of memory per node", "64.0GiB"]),
    ("gpu-memory", LeaseRequest(pool="p", gpus=1, gpu_memory_min=96 * GiB),
     ["no GPU of pool 'p' has at least 96.0GiB", "the largest has 80.0GiB"]),
    ("gang-too-wide", LeaseRequest(pool="p", nodes=3, gpus=1), ["needs 3 distinct node(s)", "only 2 of the 2"]),
    ("gang-shape", LeaseRequest(pool="p", nodes=2, gpus=3), ["only 1 of the 2 node(s) of pool 'p' can (b)"]),
    ("gang-gpu-memory", LeaseRequest(pool="p", nodes=2, gpus=1, gpu_memory_min=60 * GiB), ["only 1 of the 2"]),
    ("quota-gpus", LeaseRequest(pool="p", nodes=2, gpus=2, team="small"),
     ["asks 4 GPU(s) in all", "team 'small' may hold at most 2 GPU(s) at once (its quota)"]),
    ("quota-memory", LeaseRequest(pool="p", memory=9 * GiB, team="small"), ["at most 8.0GiB of memory"]),
]


@pytest.mark.parametrize(("request_", "expected"), [u[1:] for u in UNSATISFIABLE], ids=[u[0] for u in UNSATISFIABLE])
def test_never_satisfiable_requests_say_what_was_asked_and_what_exists(request_: LeaseRequest,
                                                                       expected: list[str]) -> None:
    with pytest.raises(UnsatisfiableRequestError) as err:
        check_satisfiable(INVENTORY, request_)
    assert request_.describe() in str(err.value)
    for part in expected:
        assert part in str(err.value)


def test_satisfiable_requests_pass() -> None:
    for ok in (LeaseRequest(pool="p", nodes=2, gpus=1, gpu_memory_min=24 * GiB, team="small"),
               LeaseRequest(pool="cpu", cpus=8, memory=64 * GiB)):
        check_satisfiable(INVENTORY, ok)


def test_copies_at_once_count_what_the_pool_and_the_team_quota_hold_together() -> None:
    from kiln.tasks.pools.placement import copies_at_once

    inventory = Inventory(pools={"p": pool(node("a", gpus=4), node("b", gpus=2))},
                          teams={"default": Team("default"), "small": Team("small", quota_gpus=3)}, source="test")
    two_gpus = LeaseRequest(pool="p", gpus=2, cpus=1)
    assert copies_at_once(inventory, two_gpus, 10) == 3  # two on a, one on b
    assert copies_at_once(inventory, two_gpus, 2) == 2  # never more than asked
    assert copies_at_once(inventory, LeaseRequest(pool="p", gpus=1, cpus=1, team="small"), 10) == 3  # the quota
    assert copies_at_once(inventory, LeaseRequest(pool="p", gpus=2, cpus=1, nodes=2), 10) == 1  # a gang: a and b
    with pytest.raises(UnsatisfiableRequestError, match="largest node"):
        copies_at_once(inventory, LeaseRequest(pool="p", gpus=8), 1)
    # A preemptible request may borrow beyond the quota, so only the pool bounds it.
    assert copies_at_once(inventory, LeaseRequest(pool="p", gpus=1, cpus=1, team="small", preemptible=True), 10) == 6


def _held(lease_id: str, node_name: str, gpus: int, priority: int, granted_at: float, first: int = 0) -> tuple:
    """A granted allocation of GPUs ``first..first+gpus-1`` of a node, and its :class:`Holder`."""
    from kiln.tasks.pools.placement import Holder

    alloc = Allocation(lease_id=lease_id, pool="p", nodes=(NodeAllocation(
        node=node_name, gpus=tuple(f"{node_name}-g{i}" for i in range(first, first + gpus))),))
    return alloc, Holder(lease_id, alloc, priority, granted_at)


@pytest.mark.parametrize(("holders", "want", "victims"), [
    # Lowest priority first, then the youngest grant.
    ([("old", "a", 2, -1, 1.0), ("young", "b", 2, -1, 2.0)], {"gpus": 2}, ["young"]),
    ([("low", "a", 2, -5, 1.0), ("young", "b", 2, -1, 2.0)], {"gpus": 2}, ["low"]),
    # A gang of two whole nodes needs both.
    ([("a0", "a", 2, -1, 1.0), ("b0", "b", 2, -1, 2.0)], {"gpus": 2, "nodes": 2}, ["a0", "b0"]),
    # The lowest-priority lease shares its node with one that is no candidate: preempting it made no room, so it is
    # spared once the next one does.
    ([("x", "a", 1, -3, 1.0), ("fixed", "a", 1, 9, 1.0, False, 1), ("y", "b", 2, -2, 1.0)], {"gpus": 2}, ["y"]),
], ids=["youngest-of-equals", "lowest-priority", "gang", "spare-unneeded"])
def test_victims_are_the_fewest_lowest_priority_youngest_leases_that_make_room(holders: list, want: dict,
                                                                               victims: list[str]) -> None:
    from kiln.tasks.pools.placement import choose_victims

    p = pool(node("a", gpus=2), node("b", gpus=2))
    made = [(_held(*h[:5], *h[6:]), h[5] if len(h) > 5 else True) for h in holders]
    granted = {a.lease_id: a for (a, _), _ in made}
    request = LeaseRequest(pool="p", **want)
    got = choose_victims(p, granted, [h for (_, h), candidate in made if candidate], request)
    assert got is not None and sorted(got) == sorted(victims)
    assert place(p, usage_of(a for i, a in granted.items() if i not in got), request)


def test_no_victim_when_preempting_every_candidate_would_still_not_make_room() -> None:
    from kiln.tasks.pools.placement import choose_victims

    p = pool(node("a", gpus=2), node("b", gpus=2))
    (fixed, _), (soft, soft_holder) = _held("fixed", "a", 2, 5, 1.0), _held("soft", "b", 1, -1, 1.0)
    # A 2-node gang of 2 GPUs each needs node a, whose lease is not a candidate.
    assert choose_victims(p, {"fixed": fixed, "soft": soft}, [soft_holder],
                          LeaseRequest(pool="p", gpus=2, nodes=2)) is None
    assert choose_victims(p, {"fixed": fixed}, [], LeaseRequest(pool="p", gpus=1)) is None
