"""The fast path's alternative placements: the first is what the locked path would grant, each next one what it
would grant if the ones before were taken, and they stop when nothing more fits (pure; no database)."""

from __future__ import annotations

from kiln.tasks.pools.allocation import LeaseRequest
from kiln.tasks.pools.grant import alternatives
from kiln.tasks.pools.inventory import GpuDevice, Node, Pool
from kiln.tasks.pools.placement import NodeUsage, place

GiB = 1024**3


def node(name: str, gpus: int = 2, cpus: int = 4, memory: int = 8 * GiB) -> Node:
    return Node(name=name, address=name, docker_url=None, cpus=tuple(range(cpus)), memory=memory,
                gpus=tuple(GpuDevice(f"{name}-g{i}", i, None, 80 * GiB) for i in range(gpus)))


def test_alternatives_are_successive_grants_of_the_same_request_and_leave_the_usage_alone() -> None:
    pool = Pool("p", (node("a"), node("b")), "pack")
    usage = {"a": NodeUsage(frozenset({"a-g0"}), frozenset({0}), GiB)}
    request = LeaseRequest(pool="p", gpus=1, cpus=1, memory=3 * GiB)
    alts = alternatives(pool, usage, request, count=4)
    assert alts[0] == place(pool, usage, request)
    assert [(a[0].node, a[0].gpus, a[0].cpus) for a in alts] == [
        ("a", ("a-g1",), (1,)),  # best fit: the busy node
        ("b", ("b-g0",), (0,)),  # a would then have no GPU left
        ("b", ("b-g1",), (1,)),
    ]  # then nothing fits: three alternatives, not four
    assert usage == {"a": NodeUsage(frozenset({"a-g0"}), frozenset({0}), GiB)}


def test_alternatives_count_memory_and_follow_spread() -> None:
    pool = Pool("p", (node("a", memory=4 * GiB), node("b", memory=4 * GiB)), "spread")
    request = LeaseRequest(pool="p", cpus=1, memory=3 * GiB)
    assert [a[0].node for a in alternatives(pool, {}, request, count=4)] == ["a", "b"]  # 3 GiB + 3 GiB > 4 GiB
    assert alternatives(pool, {}, request, count=1) == [place(pool, {}, request)]
