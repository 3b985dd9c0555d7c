"""The inventory: which pools exist, their nodes and devices, and the teams that lease from them.

Read from a YAML file (``KILN_POOLS_FILE``); without one, :func:`discover_local` describes this machine as one
pool ``local`` with one node ``localhost``. The format::

    pools:
      a100:                          # pool name
        placement: pack              # pack (default): fill busy nodes first, keep whole nodes free for big gangs
        nodes:                       #   spread: put each lease on the least used nodes
          - name: gpu-1              # unique across all pools
            address: 10.0.0.11       # where other nodes reach it (rendezvous); default: the name
            docker_url: tcp://10.0.0.11:2376   # its Docker engine; default: the local one
            cpus: 64                 # a core count (ids 0..63), a list of core ids [0, 1, 2], or auto
            memory: 512GiB           # bytes or a size (GiB/MiB binary, GB/MB decimal), or auto
            gpus:                    # a list, or auto (nvidia-smi on the machine that loads this file)
              - {index: 0, uuid: GPU-5c1e..., memory: 80GiB, model: A100-SXM4-80GB}
              - {index: 1, memory: 80GiB}
      cpu:
        placement: spread
        nodes:
          - {name: cpu-1, address: 10.0.0.21, cpus: [0, 1, 2, 3], memory: 32GiB}
    teams:                           # optional; without it every lease belongs to team "default"
      research: {priority: 10, quota: {gpus: 8, memory: 1TiB}}   # higher priority is served first
      batch: {priority: 0}                                        # no quota: bounded only by the pools

A GPU's id (what ``CUDA_VISIBLE_DEVICES`` and Docker's ``device_ids`` receive) is its UUID when known, else its
index: CUDA numbers devices fastest-first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, so an nvidia-smi index may name
another GPU inside the job, while a UUID cannot. Quotas bound the sum of a team's granted leases over all pools.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kiln.tasks.pools.allocation import Placement, PoolError, parse_size
from kiln.tasks.pools.discovery import GpuDevice, discover_cpus, discover_gpus, discover_memory

logger = logging.getLogger(__name__)

LOCAL_POOL = "local"
LOCAL_NODE = "localhost"
DEFAULT_TEAM = "default"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class InventoryError(PoolError, ValueError):
    """The inventory file is unreadable or invalid. ``problems`` holds one line per bad field, each with a fix."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid pools inventory {source}:\n{lines}")


@dataclass(frozen=True)
class Node:
    """A machine of a pool and the devices it lends."""

    name: str
    address: str
    docker_url: str | None
    cpus: tuple[int, ...]
    """CPU core ids that may be leased (a cpuset)."""
    memory: int
    """Bytes of memory that may be leased."""
    gpus: tuple[GpuDevice, ...] = ()

    def gpu(self, gpu_id: str) -> GpuDevice:
        """The GPU with this id (StopIteration if none)."""
        return next(g for g in self.gpus if g.id == gpu_id)


@dataclass(frozen=True)
class Pool:
    """Nodes leased together under one placement policy."""

    name: str
    nodes: tuple[Node, ...]
    placement: Placement = "pack"

    def node(self, name: str) -> Node:
        """The node with this name (StopIteration if none)."""
        return next(n for n in self.nodes if n.name == name)


@dataclass(frozen=True)
class Team:
    """A tenant: its queue priority and the ceiling on what it may hold at once (None: no ceiling)."""

    name: str
    priority: int = 0
    quota_gpus: int | None = None
    quota_cpus: int | None = None
    quota_memory: int | None = None


@dataclass(frozen=True)
class Inventory:
    """All pools and teams, by name."""

    pools: dict[str, Pool]
    teams: dict[str, Team] = field(default_factory=lambda: {DEFAULT_TEAM: Team(DEFAULT_TEAM)})
    source: str = "<memory>"
    """Where it came from (a file path or ``discovered``), for messages."""

    @classmethod
    def from_settings(cls) -> Inventory:
        """The inventory named by ``KILN_POOLS_FILE``, or this machine when it is unset."""
        from kiln.tasks.settings import get_settings

        return load_inventory(get_settings().pools_file)


def inventory_from_settings() -> Inventory:
    """Same as :meth:`Inventory.from_settings`."""
    return Inventory.from_settings()


# --- discovery of this machine -------------------------------------------------------------------------------

def discover_local() -> Inventory:
    """This machine as pool ``local`` with node ``localhost``; team ``default`` only."""
    node = Node(name=LOCAL_NODE, address="127.0.0.1", docker_url=None, cpus=discover_cpus(),
                memory=discover_memory(), gpus=discover_gpus())
    logger.info("discovered pool %r: %d CPU(s), %d bytes, %d GPU(s)", LOCAL_POOL, len(node.cpus), node.memory,
                len(node.gpus))
    return Inventory(pools={LOCAL_POOL: Pool(LOCAL_POOL, (node,), "pack")}, source="discovered")


# --- the YAML schema ------------------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _size_or_auto(v: Any, what: str) -> Any:
    if v == "auto":
        return v
    try:
        return parse_size(v, field_name=what)
    except ValueError as exc:
        raise ValueError(f"{exc}; write e.g. 64GiB or auto") from None


class _GpuModel(_Strict):
    index: int = Field(ge=0)
    uuid: str | None = None
    memory: int
    model: str = ""

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, v: Any) -> int:
        try:
            return parse_size(v, field_name="gpu memory")
        except ValueError as exc:
            raise ValueError(f"{exc}; write e.g. 80GiB") from None


class _NodeModel(_Strict):
    name: str = Field(pattern=_NAME)
    address: str | None = None
    docker_url: str | None = None
    cpus: int | list[int] | Literal["auto"]
    memory: int | Literal["auto"]
    gpus: list[_GpuModel] | None = Field(default_factory=list)
    """None: ``auto`` (discover on the machine that loads the file)."""

    @field_validator("cpus", mode="before")
    @classmethod
    def _cpus(cls, v: Any) -> Any:
        ok = v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or (
            isinstance(v, list) and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in v))
        if not ok:
            raise ValueError("expected a core count (16), a list of core ids ([0, 1, 2, 3]) or auto")
        if isinstance(v, list) and len(set(v)) != len(v):
            raise ValueError("core ids repeat; list each core once")
        return v

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, v: Any) -> Any:
        return _size_or_auto(v, "memory")

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpus(cls, v: Any) -> Any:
        if v == "auto":
            return None
        if v is None:
            return []
        if not isinstance(v, list):
            raise ValueError("expected a list of {index, uuid, memory, model} or auto")
        return v

    @model_validator(mode="after")
    def _unique_gpus(self) -> _NodeModel:
        if self.gpus is not None:
            for attr in ("index", "uuid"):
                seen = [getattr(g, attr) for g in self.gpus if getattr(g, attr) is not None]
                if len(set(seen)) != len(seen):
                    raise ValueError(f"two GPUs of node {self.name!r} have the same {attr}; give each its own")
        return self


class _PoolModel(_Strict):
    placement: Literal["pack", "spread"] = "pack"
    nodes: list[_NodeModel] = Field(min_length=1)


class _QuotaModel(_Strict):
    gpus: int | None = Field(default=None, ge=0)
    cpus: int | None = Field(default=None, ge=0)
    memory: int | None = None

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, v: Any) -> Any:
        if v is None:
            return None
        try:
            return parse_size(v, field_name="quota memory")
        except ValueError as exc:
            raise ValueError(f"{exc}; write e.g. 1TiB") from None


class _TeamModel(_Strict):
    priority: int = 0
    quota: _QuotaModel = Field(default_factory=_QuotaModel)


class _InventoryModel(_Strict):
    pools: dict[str, _PoolModel] = Field(min_length=1)
    teams: dict[str, _TeamModel] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names(self) -> _InventoryModel:
        import re

        for kind, names in (("pool", list(self.pools)), ("team", list(self.teams))):
            for name in names:
                if not re.match(_NAME, name):
                    raise ValueError(f"{kind} name {name!r}: use letters, digits, '_', '.' or '-' (at most 63)")
        where: dict[str, str] = {}
        for pool_name, pool in self.pools.items():
            for node in pool.nodes:
                if node.name in where:
                    raise ValueError(f"node {node.name!r} is listed in pool {where[node.name]!r} and again in pool "
                                     f"{pool_name!r}; node names are unique across pools (give a split host one "
                                     "name per pool and disjoint devices)")
                where[node.name] = pool_name
        return self


_MODELS: dict[str, type[BaseModel]] = {"": _InventoryModel, "pools": _PoolModel, "nodes": _NodeModel,
                                       "gpus": _GpuModel, "teams": _TeamModel, "quota": _QuotaModel}


_HINTS = {"too_short": "; list at least one", "int_parsing": "; write a whole number", "int_type": "; write a whole "
          "number", "string_pattern_mismatch": " (letters, digits, '_', '.' or '-')", "greater_than_equal": "",
          "dict_type": "; write a mapping of name: settings", "list_type": "; write a list"}


def _format_error(err: Any) -> str:
    loc = tuple(err["loc"])
    path = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
    path = path or "<top level>"
    if err["type"] == "extra_forbidden":
        # The model of the unknown key's parent: the nearest named collection above it.
        parents = [p for p in loc[:-1] if isinstance(p, str) and p in _MODELS]
        owner = _MODELS[parents[-1] if parents else ""]
        allowed = list(owner.model_fields)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"{path}: unknown field; {hint}allowed: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"{path}: required but missing; add it"
    found = repr(err.get("input"))
    found = found if len(found) <= 60 else found[:57] + "..."
    msg = err["msg"].removeprefix("Value error, ") + _HINTS.get(err["type"], "")
    return f"{path}: {msg}" + ("" if "found" in msg else f" (found {found})")


# --- loading --------------------------------------------------------------------------------------------------

def load_inventory(path: Path | str | None) -> Inventory:
    """Read and validate an inventory file; ``None`` discovers this machine (:func:`discover_local`).

    Raises:
        InventoryError: unreadable file, bad YAML or invalid fields; each line names the file, field and fix.
    """
    if path is None:
        return discover_local()
    source = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise InventoryError(source, [f"cannot read the file: {exc.strerror}; set KILN_POOLS_FILE to a readable "
                                      "file, or unset it to use this machine"]) from None
    except yaml.YAMLError as exc:
        raise InventoryError(source, [f"not valid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise InventoryError(source, [f"expected a mapping with 'pools' (and optionally 'teams'), found "
                                      f"{type(data).__name__}"])
    try:
        model = _InventoryModel.model_validate(data)
    except ValidationError as exc:
        raise InventoryError(source, [_format_error(e) for e in exc.errors()]) from None
    return _build(model, source)


def _build(model: _InventoryModel, source: str) -> Inventory:
    pools = {name: Pool(name, tuple(_build_node(n) for n in p.nodes), p.placement) for name, p in model.pools.items()}
    teams = {name: Team(name, t.priority, t.quota.gpus, t.quota.cpus, t.quota.memory)
             for name, t in model.teams.items()} or {DEFAULT_TEAM: Team(DEFAULT_TEAM)}
    return Inventory(pools=pools, teams=teams, source=source)


def _build_node(n: _NodeModel) -> Node:
    if n.cpus == "auto":
        cpus = discover_cpus()
    elif isinstance(n.cpus, int):
        cpus = tuple(range(n.cpus))
    else:
        cpus = tuple(sorted(n.cpus))
    if n.gpus is None:
        gpus = discover_gpus()
    else:
        gpus = tuple(GpuDevice(id=g.uuid or str(g.index), index=g.index, uuid=g.uuid, memory=g.memory, model=g.model)
                     for g in sorted(n.gpus, key=lambda g: g.index))
    memory = discover_memory() if n.memory == "auto" else int(n.memory)
    return Node(name=n.name, address=n.address or n.name, docker_url=n.docker_url, cpus=cpus, memory=memory,
                gpus=gpus)
