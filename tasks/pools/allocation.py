"""What is asked of a pool (:class:`LeaseRequest`) and what a grant returns (:class:`Allocation`).

Both are frozen, JSON-serialisable values: they travel through Airflow triggers and XCom, into launchers and
containers, and into the lease store's audit history.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Placement = Literal["pack", "spread"]

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2,
          "gi": 1024**3, "gib": 1024**3, "ti": 1024**4, "tib": 1024**4}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


class PoolError(RuntimeError):
    """Base class of resource-pool errors."""


class UnsatisfiableRequestError(PoolError, ValueError):
    """A request that can never be granted: unknown pool or team, more than the pool has, over the team's quota.

    The message says what was asked and what exists. Waiting cannot help, so callers fail at once.
    """


class LeaseLostError(PoolError):
    """A lease expired (its heartbeats stopped for longer than its TTL) or was revoked (preempted, and not given
    back within its grace period), so its devices may already belong to someone else."""


def parse_size(value: int | float | str, *, field_name: str = "memory") -> int:
    """Bytes from ``17179869184``, ``"16GiB"``, ``"16g"`` or ``"512 MiB"`` (k/m/g/t are decimal, ki/mi/gi/ti binary).

    Raises:
        ValueError: not a size; the message names ``field_name``.
    """
    if isinstance(value, bool):
        raise ValueError(f"{field_name}: expected a size such as 16GiB or 512MiB, found {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{field_name}: a size cannot be negative, found {value!r}")
        return int(value)
    m = _SIZE.match(str(value))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"{field_name}: expected a size such as 16GiB, 512MiB or a byte count, found {value!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: int) -> str:
    """``17179869184`` → ``"16.0GiB"`` (for messages and the CLI view)."""
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"


@dataclass(frozen=True)
class Owner:
    """Who holds a lease: the Airflow task try that asked for it (or a CLI/test client)."""

    dag_id: str = ""
    run_id: str = ""
    task_id: str = ""
    try_number: int = 0
    host: str = ""
    pid: int = 0

    def label(self) -> str:
        if self.dag_id:
            return f"{self.dag_id}/{self.run_id}/{self.task_id}#{self.try_number}"
        return f"{self.host or '?'}:{self.pid}"


@dataclass(frozen=True)
class LeaseRequest:
    """An all-or-nothing request: ``nodes`` distinct nodes of ``pool``, each with the per-node amounts below.

    ``nodes=2, gpus=4, cpus=16, memory=64GiB`` is a 2-node gang of 4 GPUs each; ``gpus=1, gpu_memory_min=20GiB``
    is one GPU with at least 20 GiB.
    """

    pool: str
    """The pool name from the inventory."""
    nodes: int = 1
    """Distinct nodes in the gang."""
    gpus: int = 0
    """GPUs per node."""
    gpu_memory_min: int = 0
    """Bytes each granted GPU must have at least (0: any)."""
    cpus: int = 0
    """CPU cores per node (granted as specific core ids, for a cpuset)."""
    memory: int = 0
    """Bytes of memory per node."""
    team: str = "default"
    """The tenant whose quota this counts against."""
    priority: int | None = None
    """Queue priority (higher first); ``None`` takes the team's priority."""
    placement: Placement | None = None
    """``pack`` (fill busy nodes first) or ``spread``; ``None`` takes the pool's policy."""
    ttl_s: float = 60.0
    """The lease expires unless heartbeated at least this often."""
    preemptible: bool = False
    """The holder checkpoints and may be preempted: by requests of higher priority, and by other teams' requests
    while its team holds more than its quota (only a preemptible request may borrow beyond the quota)."""
    grace_s: float = 60.0
    """Seconds a preempted holder has to checkpoint and give its devices back before the lease is revoked."""
    group: str | None = None
    """Requests that share a cap (a tuned run's trials)."""
    group_limit: int | None = None
    """The most leases of ``group`` granted at once in the pool; a request over it waits though it fits."""

    def __post_init__(self) -> None:
        for name in ("nodes",):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, found {getattr(self, name)}")
        for name in ("gpus", "gpu_memory_min", "cpus", "memory"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: cannot be negative, found {getattr(self, name)}")
        for name in ("ttl_s", "grace_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, found {getattr(self, name)}")
        if self.group_limit is not None and (self.group_limit < 1 or not self.group):
            raise ValueError(f"group_limit: must be at least 1 and come with a group, found {self.group_limit} for "
                             f"group {self.group!r}")
        if self.placement not in (None, "pack", "spread"):
            raise ValueError(f"placement: expected 'pack' or 'spread', found {self.placement!r}")
        if not self.pool:
            raise ValueError("pool: a pool name is required")

    def describe(self) -> str:
        """``2 node(s) x {4 GPU(s) >= 20.0GiB, 16 CPU(s), 64.0GiB}`` for messages."""
        parts = []
        if self.gpus:
            parts.append(f"{self.gpus} GPU(s)" + (f" >= {format_size(self.gpu_memory_min)}"
                                                   if self.gpu_memory_min else ""))
        if self.cpus:
            parts.append(f"{self.cpus} CPU(s)")
        if self.memory:
            parts.append(format_size(self.memory))
        return f"{self.nodes} node(s) x {{{', '.join(parts) or 'nothing'}}} from pool {self.pool!r}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LeaseRequest:
        return cls(**d)


@dataclass(frozen=True)
class NodeAllocation:
    """The concrete devices granted on one node."""

    node: str
    """Node name from the inventory."""
    address: str = "127.0.0.1"
    """Host name or IP other nodes reach this one at (rendezvous endpoint for rank 0)."""
    docker_url: str | None = None
    """The node's Docker endpoint (``unix:///var/run/docker.sock``, ``tcp://host:2376``); None: the local default."""
    gpus: tuple[str, ...] = ()
    """GPU ids as the driver knows them (index ``"0"`` or ``"GPU-<uuid>"``): CUDA_VISIBLE_DEVICES / device_ids."""
    cpus: tuple[int, ...] = ()
    """CPU core ids: a cpuset."""
    memory: int = 0
    """Bytes: the memory limit."""

    def cuda_visible_devices(self) -> str:
        return ",".join(self.gpus)

    def cpuset(self) -> str:
        """``"0,1"``: Docker's ``cpuset_cpus`` / taskset format ("" when no cores were asked for)."""
        return ",".join(str(c) for c in self.cpus)


@dataclass(frozen=True)
class Allocation:
    """A granted lease: its id and the devices per node, rank-0 node first."""

    lease_id: str
    pool: str
    nodes: tuple[NodeAllocation, ...] = field(default_factory=tuple)
    ttl_s: float = 60.0

    @property
    def master(self) -> NodeAllocation:
        return self.nodes[0]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Allocation:
        return cls.from_dict(json.loads(text))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Allocation:
        nodes = tuple(NodeAllocation(**{**n, "gpus": tuple(n.get("gpus", ())), "cpus": tuple(n.get("cpus", ()))})
                      for n in d.get("nodes", ()))
        return cls(lease_id=d["lease_id"], pool=d["pool"], nodes=nodes, ttl_s=float(d.get("ttl_s", 60.0)))


class PoolTimeoutError(PoolError, TimeoutError):
    """A blocking acquire was not granted in time; its queue entry was cancelled. The message names the request
    and the pool's usage at that moment."""
