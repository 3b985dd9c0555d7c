"""Where a lease goes: pure functions from (pool, devices in use, request) to concrete devices per node.

No I/O and no clock: the lease store calls :func:`place` under its pool lock with the usage it just read, and
:func:`check_satisfiable` before queueing anything, so a request that can never fit fails at once with a message
instead of waiting forever.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from kiln.tasks.pools.allocation import Allocation, LeaseRequest, NodeAllocation, UnsatisfiableRequestError, format_size
from kiln.tasks.pools.inventory import GpuDevice, Inventory, Node, Pool


@dataclass(frozen=True)
class NodeUsage:
    """What is held on one node right now."""

    gpus: frozenset[str] = field(default_factory=frozenset)
    """GPU ids held."""
    cpus: frozenset[int] = field(default_factory=frozenset)
    """CPU core ids held."""
    memory: int = 0
    """Bytes held."""


def usage_of(allocations: Iterable[Allocation]) -> dict[str, NodeUsage]:
    """Sum the devices of granted allocations per node name."""
    gpus: dict[str, set[str]] = {}
    cpus: dict[str, set[int]] = {}
    memory: dict[str, int] = {}
    for alloc in allocations:
        for n in alloc.nodes:
            gpus.setdefault(n.node, set()).update(n.gpus)
            cpus.setdefault(n.node, set()).update(n.cpus)
            memory[n.node] = memory.get(n.node, 0) + n.memory
    return {name: NodeUsage(frozenset(gpus[name]), frozenset(cpus[name]), memory[name]) for name in gpus}


class UsageTracker:
    """Per-node usage kept current from the set of granted allocations, updated by difference.

    The store sees nearly the same set of leases at every grant in a pool, so adding the new ones and removing the
    ended ones costs far less than re-summing every allocation while the pool is locked. Allocations never share
    a device, so removing one's devices from the sets is exact.
    """

    def __init__(self) -> None:
        self._held: dict[str, Allocation] = {}
        self._gpus: dict[str, set[str]] = {}
        self._cpus: dict[str, set[int]] = {}
        self._memory: dict[str, int] = {}

    def update(self, granted: Mapping[str, Allocation]) -> dict[str, NodeUsage]:
        """Usage per node given the allocations granted now, by lease id."""
        for lease_id in self._held.keys() - granted.keys():
            for n in self._held.pop(lease_id).nodes:
                self._gpus[n.node].difference_update(n.gpus)
                self._cpus[n.node].difference_update(n.cpus)
                self._memory[n.node] -= n.memory
        for lease_id in granted.keys() - self._held.keys():
            allocation = self._held[lease_id] = granted[lease_id]
            for n in allocation.nodes:
                self._gpus.setdefault(n.node, set()).update(n.gpus)
                self._cpus.setdefault(n.node, set()).update(n.cpus)
                self._memory[n.node] = self._memory.get(n.node, 0) + n.memory
        # NodeUsage over the live sets (not copies): place() only reads them.
        return {name: NodeUsage(self._gpus[name], self._cpus[name], self._memory[name])  # type: ignore[arg-type]
                for name in self._gpus}


def _fit(node: Node, used: NodeUsage, request: LeaseRequest) -> NodeAllocation | None:
    """The devices ``request`` would get on ``node`` given ``used``, or None if the node cannot host it now."""
    if node.memory - used.memory < request.memory:
        return None
    eligible = [g for g in node.gpus if g.id not in used.gpus and g.memory >= request.gpu_memory_min]
    if len(eligible) < request.gpus:
        return None
    free_cpus = [c for c in node.cpus if c not in used.cpus]
    if len(free_cpus) < request.cpus:
        return None
    # Smallest sufficient GPUs first: the large ones stay free for requests that need their memory.
    gpus = sorted(eligible, key=lambda g: (g.memory, g.index))[:request.gpus]
    return NodeAllocation(node=node.name, address=node.address, docker_url=node.docker_url,
                          gpus=tuple(g.id for g in sorted(gpus, key=lambda g: g.index)),
                          cpus=tuple(free_cpus[:request.cpus]), memory=request.memory)


def _fraction(used: int, total: int) -> float:
    return used / total if total else 0.0


def _order_key(node: Node, used: NodeUsage, request: LeaseRequest, placement: str) -> tuple:
    free_gpus = len(node.gpus) - len(used.gpus)
    free_cpus = len(node.cpus) - len(used.cpus)
    free_memory = node.memory - used.memory
    if placement == "pack":
        # Best fit: the node left with the least free after this grant comes first, so idle nodes stay whole.
        return (free_gpus - request.gpus, free_cpus - request.cpus, free_memory - request.memory, node.name)
    return (_fraction(len(used.gpus), len(node.gpus)), _fraction(len(used.cpus), len(node.cpus)),
            _fraction(used.memory, node.memory), node.name)


def _may_fit(node: Node, used: NodeUsage, request: LeaseRequest) -> bool:
    """The counting part of :func:`_fit` (cheap: no device lists are built)."""
    return (node.memory - used.memory >= request.memory and len(node.gpus) - len(used.gpus) >= request.gpus
            and len(node.cpus) - len(used.cpus) >= request.cpus)


def place(pool: Pool, usage: Mapping[str, NodeUsage], request: LeaseRequest) -> tuple[NodeAllocation, ...] | None:
    """Concrete devices on ``request.nodes`` distinct nodes of ``pool``, or None if that does not fit now.

    Args:
        pool: the pool from the inventory.
        usage: what is held per node name (nodes absent from it are idle).
        request: the per-node shape and the gang size; ``request.placement`` overrides the pool's policy.

    Returns:
        One :class:`NodeAllocation` per node, in rank order (the first hosts rank 0), or None. Deterministic:
        the same inputs always give the same devices.
    """
    placement = request.placement or pool.placement
    empty = NodeUsage()
    candidates = []
    for node in pool.nodes:
        used = usage.get(node.name, empty)
        if _may_fit(node, used, request):
            candidates.append((_order_key(node, used, request, placement), node, used))
    if len(candidates) < request.nodes:
        return None
    candidates.sort(key=lambda c: c[0])
    chosen = []
    for _, node, used in candidates:  # in policy order; only the GPU-memory filter can still reject a node
        fit = _fit(node, used, request)
        if fit is not None:
            chosen.append(fit)
            if len(chosen) == request.nodes:
                return tuple(chosen)
    return None


def _could_host(node: Node, request: LeaseRequest) -> bool:
    """Whether an idle ``node`` could host the per-node shape."""
    return _fit(node, NodeUsage(), request) is not None


def _largest(nodes: Iterable[Node], size: Callable[[Node], int]) -> tuple[int, str]:
    biggest = max(nodes, key=size, default=None)  # the first of equals, in inventory order
    return (size(biggest), biggest.name) if biggest is not None else (0, "-")


def check_satisfiable(inventory: Inventory, request: LeaseRequest) -> None:
    """Raise if ``request`` could never be granted, even with every device of its pool free.

    Raises:
        UnsatisfiableRequestError: unknown pool or team, more per node than any node has, no GPU with enough
            memory, fewer nodes able to host the shape than the gang needs, or over the team's quota. The message
            says what was asked and what exists.
    """
    asked = request.describe()
    pool = inventory.pools.get(request.pool)
    if pool is None:
        raise UnsatisfiableRequestError(f"{asked}: pool {request.pool!r} does not exist; pools in "
                                        f"{inventory.source}: {', '.join(sorted(inventory.pools)) or 'none'}")
    team = inventory.teams.get(request.team)
    if team is None:
        raise UnsatisfiableRequestError(f"{asked}: team {request.team!r} does not exist; teams in "
                                        f"{inventory.source}: {', '.join(sorted(inventory.teams))}")
    for what, amount, size, fmt in (("GPU(s)", request.gpus, lambda n: len(n.gpus), str),
                                    ("CPU(s)", request.cpus, lambda n: len(n.cpus), str),
                                    ("of memory", request.memory, lambda n: n.memory, format_size)):
        most, where = _largest(pool.nodes, size)
        if amount > most:
            raise UnsatisfiableRequestError(f"{asked}: asks {fmt(amount)} {what} per node but the largest node of "
                                            f"pool {pool.name!r} has {fmt(most)} ({where})")
    if request.gpus and request.gpu_memory_min:
        gpus: list[GpuDevice] = [g for n in pool.nodes for g in n.gpus]
        biggest = max(g.memory for g in gpus)
        if biggest < request.gpu_memory_min:
            raise UnsatisfiableRequestError(f"{asked}: no GPU of pool {pool.name!r} has at least "
                                            f"{format_size(request.gpu_memory_min)}; the largest has "
                                            f"{format_size(biggest)}")
    able = [n.name for n in pool.nodes if _could_host(n, request)]
    if len(able) < request.nodes:
        raise UnsatisfiableRequestError(
            f"{asked}: needs {request.nodes} distinct node(s) that can each host that shape but only {len(able)} "
            f"of the {len(pool.nodes)} node(s) of pool {pool.name!r} can ({', '.join(able) or 'none'})")
    if request.preemptible:
        return  # a preemptible request may borrow beyond its team's quota
    for what, total, quota, fmt in (("GPU(s)", request.gpus * request.nodes, team.quota_gpus, str),
                                    ("CPU(s)", request.cpus * request.nodes, team.quota_cpus, str),
                                    ("of memory", request.memory * request.nodes, team.quota_memory, format_size)):
        if quota is not None and total > quota:
            raise UnsatisfiableRequestError(f"{asked}: asks {fmt(total)} {what} in all but team {team.name!r} may "
                                            f"hold at most {fmt(quota)} {what} at once (its quota)")


def copies_at_once(inventory: Inventory, request: LeaseRequest, wanted: int) -> int:
    """How many leases of ``request`` its pool and team could hold at once with every device free, up to
    ``wanted`` (a study's trials at once are checked against this before any is queued). A preemptible request
    may borrow beyond its team's quota, so only the pool bounds it.

    Raises:
        UnsatisfiableRequestError: even one copy could never be granted (:func:`check_satisfiable`).
    """
    check_satisfiable(inventory, request)
    pool, team = inventory.pools[request.pool], inventory.teams[request.team]
    held: list[Allocation] = []
    for count in range(wanted):
        quotas = ((request.gpus, team.quota_gpus), (request.cpus, team.quota_cpus),
                  (request.memory, team.quota_memory))
        over_quota = not request.preemptible and any(
            quota is not None and (count + 1) * amount * request.nodes > quota for amount, quota in quotas)
        nodes = None if over_quota else place(pool, usage_of(held), request)
        if nodes is None:
            return count
        held.append(Allocation(lease_id=f"copy-{count}", pool=pool.name, nodes=nodes, ttl_s=request.ttl_s))
    return wanted


@dataclass(frozen=True)
class Holder:
    """A granted lease as preemption sees it."""

    lease_id: str
    allocation: Allocation
    priority: int
    granted_at: float


def choose_victims(pool: Pool, granted: Mapping[str, Allocation], candidates: Iterable[Holder],
                   request: LeaseRequest) -> list[str] | None:
    """The leases to preempt so that ``request`` fits, or None when preempting every candidate would not make it
    fit (then none is preempted).

    Candidates are taken lowest priority first, then the youngest grant first (it has the least work to lose),
    until the request fits; a victim the others already make room for is then spared.

    Args:
        pool: the pool from the inventory.
        granted: every granted allocation of the pool, by lease id (candidates included).
        candidates: the preemptible leases the request may take devices from.
        request: what must fit.
    """
    order = sorted(candidates, key=lambda h: (h.priority, -h.granted_at, h.lease_id))
    chosen: list[str] = []

    def fits(without: list[str]) -> bool:
        gone = set(without)
        return place(pool, usage_of(a for i, a in granted.items() if i not in gone), request) is not None

    for holder in order:
        chosen.append(holder.lease_id)
        if fits(chosen):
            break
    else:
        return None
    for lease_id in reversed(chosen[:-1]):  # the last one was needed; an earlier one may not be
        rest = [i for i in chosen if i != lease_id]
        if fits(rest):
            chosen = rest
    return chosen
