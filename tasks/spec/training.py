"""The spec sections of the ``train`` step: ``model`` (the network) and ``training`` (the loop, the launcher, the
leased resources and the containers)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from kiln.tasks.spec.base import DAY_S, MAX_COUNT, Int64, _Strict

#: The widest layer (units or channels) a spec may ask for.
MAX_WIDTH = 65_536


class ModelSpec(_Strict):
    """The network trained by the ``train`` step."""

    type: Literal["mlp", "cnn"] = "mlp"
    """``mlp`` for tabular features; ``cnn`` for small images whose pixels are the feature columns in order."""
    hidden_sizes: list[int] = Field(default_factory=lambda: [64, 32])
    """MLP hidden layer widths (CNN: width of the dense layer after the convolutions, first entry)."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    image_shape: tuple[Annotated[int, Field(ge=1, le=4096)], Annotated[int, Field(ge=1, le=4096)]] | None = None
    """CNN only: height and width of the image; height*width must equal the number of feature columns."""
    channels: list[int] = Field(default_factory=lambda: [16, 32])
    """CNN only: output channels of each 3x3 convolution."""

    @field_validator("hidden_sizes", "channels")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(not 1 <= x <= MAX_WIDTH for x in v):
            raise ValueError(f"must be a non-empty list of integers from 1 to {MAX_WIDTH}")
        return v

    @model_validator(mode="after")
    def _cnn_needs_shape(self) -> ModelSpec:
        if self.type == "cnn" and self.image_shape is None:
            raise ValueError("model.type 'cnn' needs image_shape: [height, width]")
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
    """The job checkpoints, so a higher-priority request may preempt it; it then fails for retry and resumes."""

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
