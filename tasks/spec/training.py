"""The spec sections of the ``train`` step: ``model`` (the network) and ``training`` (the loop, the launcher, the
leased resources and the containers)."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from kiln.tasks.spec.base import DAY_S, MAX_COUNT, Int64, _Strict

#: The widest layer (units or channels) a spec may ask for.
MAX_WIDTH = 65_536
#: ``module.path:callable`` or ``file.py:callable`` (a file relative to ``code.path``).
CALLABLE_REF = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
                          r"|[A-Za-z0-9_][A-Za-z0-9_./-]*\.py):[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*$")
MAX_REF_CHARS = 200
#: Bounds of ``model.options`` and ``training.params``: small settings, not data.
MAX_JSON_DEPTH = 4
MAX_JSON_ITEMS = 256
MAX_JSON_CHARS = 8192
#: Keyword arguments kiln passes to a model factory itself.
FACTORY_ARGS = ("input_dim", "n_outputs", "features")


def check_callable_ref(value: str | None) -> str | None:
    """A ``module.path:callable`` / ``file.py:callable`` reference, checked for form only (it is imported where
    the code runs, which may be a container with requirements this machine lacks)."""
    if value is None:
        return None
    if len(value) > MAX_REF_CHARS or not CALLABLE_REF.match(value) or ".." in value.split(":")[0].split("/"):
        raise ValueError(f"must be 'module.path:callable' (e.g. 'resmlp:build') or 'file.py:callable' with a file "
                         f"inside code.path, at most {MAX_REF_CHARS} characters")
    return value


def check_json_settings(value: dict[str, Any]) -> dict[str, Any]:
    """User settings (``model.options``, ``training.params``): identifier keys, JSON values, bounded in depth,
    count and size."""
    items = 0

    def walk(node: Any, depth: int) -> None:
        nonlocal items
        items += 1
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"nests deeper than {MAX_JSON_DEPTH} levels; keep settings flat")
        if items > MAX_JSON_ITEMS:
            raise ValueError(f"holds more than {MAX_JSON_ITEMS} values; pass data as files, not settings")
        if isinstance(node, dict):
            for key, child in node.items():
                if not isinstance(key, str):
                    raise ValueError(f"key {key!r} is not a string")
                walk(child, depth + 1)
        elif isinstance(node, list):
            for child in node:
                walk(child, depth + 1)
        elif not (node is None or isinstance(node, (bool, int, float, str))):
            raise ValueError(f"holds a {type(node).__name__}; only strings, numbers, booleans, null, lists and "
                             "mappings are allowed")

    bad = [k for k in value if not k.isidentifier()]
    if bad:
        raise ValueError(f"key {bad[0]!r} is not a Python identifier (letters, digits, _): keys become keyword "
                         "arguments and attribute names")
    walk(value, 0)
    size = len(json.dumps(value, allow_nan=False))
    if size > MAX_JSON_CHARS:
        raise ValueError(f"is {size} characters as JSON, more than {MAX_JSON_CHARS}; pass data as files")
    return value


class ModelSpec(_Strict):
    """The network trained by the ``train`` step."""

    type: Literal["mlp", "cnn", "custom"] = "mlp"
    """``mlp`` for tabular features; ``cnn`` for small images whose pixels are the feature columns in order;
    ``custom`` for a network built by the pipeline's own code (``factory``)."""
    hidden_sizes: list[int] = Field(default_factory=lambda: [64, 32])
    """MLP hidden layer widths (CNN: width of the dense layer after the convolutions, first entry)."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    image_shape: tuple[Annotated[int, Field(ge=1, le=4096)], Annotated[int, Field(ge=1, le=4096)]] | None = None
    """CNN only: height and width of the image; height*width must equal the number of feature columns."""
    channels: list[int] = Field(default_factory=lambda: [16, 32])
    """CNN only: output channels of each 3x3 convolution."""
    factory: str | None = None
    """``custom`` only: ``module.path:callable`` (or ``file.py:callable``) importable from ``code.path`` or an
    installed package, called as ``factory(input_dim=..., n_outputs=..., **options)`` (plus ``features=`` when it
    takes that argument) and returning an ``nn.Module`` that maps ``[n, input_dim]`` to ``[n, n_outputs]``."""
    options: dict[str, Any] = Field(default_factory=dict)
    """``custom`` only: keyword arguments for the factory (JSON values, bounded in depth and size)."""

    @field_validator("hidden_sizes", "channels")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(not 1 <= x <= MAX_WIDTH for x in v):
            raise ValueError(f"must be a non-empty list of integers from 1 to {MAX_WIDTH}")
        return v

    @field_validator("factory")
    @classmethod
    def _factory_ref(cls, v: str | None) -> str | None:
        return check_callable_ref(v)

    @field_validator("options")
    @classmethod
    def _options(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_json_settings(v)
        reserved = [k for k in v if k in FACTORY_ARGS]
        if reserved:
            raise ValueError(f"'{reserved[0]}' is passed by kiln itself (from the features); remove it from "
                             "model.options")
        return v

    @model_validator(mode="after")
    def _fields_of_type(self) -> ModelSpec:
        if self.type == "cnn" and self.image_shape is None:
            raise ValueError("model.type 'cnn' needs image_shape: [height, width]")
        if self.type == "custom":
            if self.factory is None:
                raise ValueError("model.type 'custom' needs factory: 'module.path:callable' (e.g. 'resmlp:build', "
                                 "a function in the pipeline's code folder that returns an nn.Module)")
            # Compared with the defaults, not the fields set: a dumped spec (trigger overrides, TrainConfig JSON)
            # holds every field.
            builtin = [f for f in ("hidden_sizes", "dropout", "image_shape", "channels")
                       if getattr(self, f) != type(self).model_fields[f].get_default(call_default_factory=True)]
            if builtin:
                raise ValueError(f"model.{builtin[0]} is a setting of the built-in networks; a custom model takes "
                                 f"its settings as model.options (e.g. options: {{{builtin[0]}: ...}})")
        else:
            given = [f for f, v in (("factory", self.factory), ("options", self.options)) if v]
            if given:
                raise ValueError(f"model.{given[0]} is only used with model.type 'custom' (found type "
                                 f"'{self.type}'): set type: custom, or remove {given[0]}")
        return self


class ResourcesSpec(_Strict):
    """What the ``train`` step leases from a resource pool, per node, before it starts any worker."""

    pool: str = "local"
    """A pool of the inventory (``KILN_POOLS_FILE``); ``local`` is this machine when no inventory is given."""
    team: str = "default"
    """The team (tenant) whose quota the lease counts against."""
    priority: int | None = Field(default=None, ge=-1_000_000, le=1_000_000)
    """Queue priority, higher first; default: the team's priority."""
    gpus: int = Field(default=0, ge=0, le=64)
    """GPUs per node (``CUDA_VISIBLE_DEVICES`` / Docker device requests carry the leased ids)."""
    gpu_memory_min: str | int = 0
    """Least memory each GPU must have, e.g. ``20GiB`` (0: any)."""
    cpus: int | None = Field(default=None, ge=1, le=1024)
    """CPU cores per node, leased as a cpuset; default ``nproc * threads_per_proc``."""
    memory: str | int = "4GiB"
    """Memory per node, e.g. ``16GiB``: the containers' limit."""
    placement: Literal["pack", "spread"] | None = None
    """Where the gang's nodes go: ``pack`` fills busy nodes first, ``spread`` prefers idle ones; default: the pool's."""
    wait_timeout_s: int = Field(default=3600, ge=1, le=30 * DAY_S)
    """The task fails if the lease is not granted within this time (it waits in the triggerer, not a worker)."""
    ttl_s: int = Field(default=60, ge=5, le=DAY_S)
    """The lease is reclaimed this long after its holder stops heartbeating (a killed worker frees its devices)."""
    preemptible: bool = False
    """The job checkpoints, so a higher-priority request (or another team, while this one borrows beyond its quota)
    may preempt it: it checkpoints and exits, its task queues for devices again and resumes from the checkpoint.
    Only a preemptible request may borrow beyond its team's quota."""
    preempt_grace_s: int = Field(default=60, ge=1, le=DAY_S)
    """Seconds a preempted job has to checkpoint and exit; then it is killed and its lease revoked (it resumes from
    its last complete epoch)."""

    @field_validator("gpu_memory_min", "memory")
    @classmethod
    def _size(cls, v: str | int) -> str | int:
        from kiln.tasks.pools.allocation import parse_size

        parse_size(v, field_name="size")
        return v


class DockerSpec(_Strict):
    """Container settings of the ``docker`` launcher."""

    image: str | None = None
    """The training image; default ``KILN_TRAIN_IMAGE`` (``make image`` builds ``kiln-train:cpu``)."""
    shm_size: str = "1g"
    """``/dev/shm`` size: DataLoader workers and NCCL need more than Docker's 64 MB."""
    ulimits: dict[str, tuple[Int64, Int64]] = Field(default_factory=dict)
    """``{name: [soft, hard]}``, e.g. ``{memlock: [-1, -1]}`` on GPU hosts. Raising a limit above the host's hard
    limit needs CAP_SYS_RESOURCE in the daemon; without it the container cannot start and the job fails at once."""
    network: Literal["bridge", "host"] = "bridge"
    """``bridge``: a private network per job (nodes on one Docker host); ``host``: the node's network, required
    when the gang spans several Docker hosts (NCCL/gloo connect to the nodes' addresses)."""


class TrainingSpec(_Strict):
    """The ``train`` step's settings. The fields in ``PARAM_FIELDS`` can be overridden when a run is triggered."""

    epochs: int = Field(default=10, ge=1, le=10_000, title="Epochs")
    """Passes over the training split."""
    batch_size: int = Field(default=32, ge=1, le=65_536, title="Batch size")
    """Rows per optimizer step, per worker process."""
    learning_rate: float = Field(default=1e-3, gt=0, le=10, title="Learning rate")
    """Step size of the optimizer."""
    weight_decay: float = Field(default=0.0, ge=0)
    """L2 penalty of the optimizer."""
    optimizer: Literal["adam", "sgd"] = "adam"
    seed: int = Field(default=42, ge=0, le=2**32 - 1, title="Seed")
    """Seeds sampling, the split and training: same seed, same model."""
    nproc: int = Field(default=2, ge=1, le=64, title="Worker processes")
    """Worker processes (DDP ranks) on each node."""
    threads_per_proc: int = Field(default=1, ge=1, le=64)
    """torch intra-op threads per rank."""
    launcher: Literal["local", "docker"] = Field(default="local", title="Launcher")
    """How workers are started: ``local`` runs torchrun on this machine; ``docker`` runs one container per node,
    each running torchrun (gloo on CPU, NCCL on GPUs). Same checkpoints, metrics and outputs either way."""
    nodes: int = Field(default=1, ge=1, le=256, title="Nodes")
    """Nodes in the gang (``nproc`` ranks on each); more than one needs the ``docker`` launcher."""
    max_restarts: int = Field(default=0, ge=0, le=100)
    """Times the whole gang is restarted after a failure, resuming from the last complete checkpoint."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    docker: DockerSpec = Field(default_factory=DockerSpec)
    timeout_s: int = Field(default=1800, ge=10, le=30 * DAY_S)
    """The whole training job fails if it runs longer than this (a hung peer cannot block a worker forever)."""
    log_every_steps: int = Field(default=20, ge=1, le=MAX_COUNT)
    """A progress line every this many optimizer steps (rank 0)."""
    entrypoint: str | None = None
    """The pipeline's own training loop, ``module.path:function`` or ``file.py:function`` (a file inside
    ``code.path``): ``def train(ctx: TrainContext) -> TrainedModel`` (``kiln.tasks.training.api``). Default: kiln's
    own loop, written against the same API."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Hyper-parameters of the pipeline's own code (JSON values, bounded), seen by the loop as ``ctx.params`` and,
    merged with the training fields, ``ctx.hparams``."""

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint_ref(cls, v: str | None) -> str | None:
        return check_callable_ref(v)

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_json_settings(v)
        shadowed = [k for k in v if k in cls.model_fields]
        if shadowed:
            raise ValueError(f"'{shadowed[0]}' is a training field of its own (training.{shadowed[0]}), and "
                             "ctx.hparams merges both: set training." + shadowed[0] + " instead, or rename the param")
        return v

    @model_validator(mode="after")
    def _local_is_one_node(self) -> TrainingSpec:
        if self.launcher == "local" and self.nodes > 1:
            raise ValueError(f"training.nodes is {self.nodes} but launcher 'local' runs on one node: "
                             "set training.launcher: docker, or nodes: 1")
        if 0 < self.resources.gpus < self.nproc:
            raise ValueError(f"training.nproc is {self.nproc} but training.resources.gpus is {self.resources.gpus}: "
                             "DDP runs one rank per GPU (NCCL cannot share one), so set nproc to at most the GPUs "
                             "leased per node")
        return self

    def lease_cpus(self) -> int:
        """CPU cores leased per node."""
        return self.resources.cpus or self.nproc * self.threads_per_proc


#: Most requirement lines a pipeline may name, and the longest line.
MAX_REQUIREMENTS = 100
MAX_REQUIREMENT_CHARS = 200


class CodeSpec(_Strict):
    """The pipeline's own code: the folder that travels with the spec, and the packages it needs."""

    path: str | None = None
    """Folder holding the code (``model.factory``, ``training.entrypoint``), relative to the spec file's folder;
    put on ``sys.path`` of the training processes and copied into the training image. Default: the folder named
    as the pipeline beside the spec file, when there is one."""
    requirements: list[str] = Field(default_factory=list, max_length=MAX_REQUIREMENTS)
    """Extra Python requirements of the code, one PEP 508 line each (``tabulate==0.9.0``): installed into the
    training image built for the ``docker`` launcher, checked against the installed packages by ``local``."""

    @field_validator("requirements")
    @classmethod
    def _pep508(cls, v: list[str]) -> list[str]:
        from packaging.requirements import InvalidRequirement, Requirement

        for line in v:
            if len(line) > MAX_REQUIREMENT_CHARS:
                raise ValueError(f"requirement {line[:40]!r}... is longer than {MAX_REQUIREMENT_CHARS} characters")
            try:
                Requirement(line)
            except InvalidRequirement as exc:
                reason = str(exc).splitlines()[0]
                raise ValueError(f"{line!r} is not a PEP 508 requirement ({reason}); write e.g. 'tabulate==0.9.0'"
                                 ) from None
        return v
