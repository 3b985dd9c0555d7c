"""What one container of a training gang is made of: its torchrun command, its ``containers.create`` arguments
(devices, cpuset, memory, hardening, mounts), the user it runs as, and what an engine's refusal means.

Pure functions, no engine: unit-testable, and the one place that maps a lease onto Docker.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from docker.errors import DockerException, ImageNotFound
from docker.types import DeviceRequest, Ulimit

from kiln.tasks.pools.allocation import Allocation, NodeAllocation
from kiln.tasks.spec import DockerSpec
from kiln.tasks.training.job import TRAIN_MODULE, TrainConfig

log = logging.getLogger(__name__)

#: Label on every container and network of a job; its value is :attr:`DockerGangLauncher.job_id`.
JOB_LABEL = "kiln.job"
#: Label naming the process that launched the job (``host/pid/start time``): a job whose launcher is gone is an
#: orphan, removed by the launcher's watchdog or the next launch's sweep (:mod:`kiln.tasks.launch.container_reaper`).
OWNER_LABEL = "kiln.owner"
#: The most processes and threads a training container may hold: a fork bomb in user code stops there, not at
#: the host's limit (torch starts dozens of threads per rank; 4096 leaves room for many ranks and loaders).
PIDS_LIMIT = 4096
#: The c10d rendezvous port on the rank-0 node.
RDZV_PORT = 29500
#: The container user when the launcher itself runs as root: an unprivileged uid in the root *group* (the
#: convention for arbitrary-uid containers), given group write on exactly the paths the job writes.
ROOT_FALLBACK_USER = "1000:0"


def gang_nodes(config: TrainConfig, nproc: int, allocation: Allocation | None) -> tuple[NodeAllocation, ...]:
    """The nodes of a gang, one container each: the lease's, or stand-ins without a lease.

    Raises:
        ValueError: the lease does not fit the config (node count, GPUs per rank, bridge across engines, host
            networking on shared addresses); the message names the setting to change.
    """
    t = config.training
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, found {nproc}")
    nodes = allocation.nodes if allocation else tuple(NodeAllocation(node=f"node{i}") for i in range(t.nodes))
    if len(nodes) != t.nodes:
        raise ValueError(f"training.nodes is {t.nodes} but the lease has {len(nodes)} node(s)")
    if t.docker.network == "bridge" and len({n.docker_url for n in nodes}) > 1:
        raise ValueError("training.docker.network 'bridge' needs every node on one Docker engine, but the lease "
                         "spans several: set training.docker.network: host")
    if t.docker.network == "host" and len({n.address for n in nodes}) < len(nodes):
        raise ValueError("training.docker.network 'host' needs a distinct address per node (the nodes share the "
                         f"host's network), found {[n.address for n in nodes]}: use bridge on a single host")
    for n in nodes:
        if n.gpus and nproc > len(n.gpus):
            raise ValueError(f"node {n.node}: {nproc} ranks per node but only {len(n.gpus)} leased GPU(s)")
    return nodes


def torchrun_command(*, nnodes: int, nproc: int, rdzv_endpoint: str, rdzv_id: str, config_path: str,
                     local_addr: str | None = None, shutdown_timeout_s: int = 30) -> list[str]:
    """The command each container runs: torchrun with a c10d rendezvous, restarts left to the launcher.

    ``local_addr`` (host networking): the address the node announces to the others, instead of its host name,
    which other hosts may not resolve and which every container on one host shares. ``shutdown_timeout_s``: how
    long torchrun, once stopped (SIGTERM), waits for its ranks to checkpoint and exit before it kills them itself;
    no shorter than the grace period the launcher gives, or it would cut that short.
    """
    return ["python", "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
            "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}", f"--rdzv_id={rdzv_id}", "--max-restarts=0",
            f"--shutdown-timeout={shutdown_timeout_s}", *([f"--local_addr={local_addr}"] if local_addr else []),
            "-m", TRAIN_MODULE, "--config", config_path]


def container_kwargs(node: NodeAllocation, spec: DockerSpec, *, image: str, name: str, command: list[str],
                     network: str, user: str, volumes: dict[str, dict[str, str]], labels: dict[str, str],
                     threads_per_proc: int, workdir: str, secrets: dict[str, str] | None = None) -> dict[str, Any]:
    """The ``client.containers.create(**kwargs)`` arguments for one node of a gang (pure: no engine needed).

    Args:
        node: the node's lease: its GPUs become a device request, its cores the cpuset, its memory the limit.
        spec: ``training.docker``: ``shm_size``, ``ulimits`` and ``network`` (``host`` or ``bridge``).
        network: the job's bridge network name (ignored when ``spec.network`` is ``host``).
        user: ``uid:gid`` the container runs as (never root).
        volumes: bind mounts, ``{host_path: {"bind": path, "mode": "ro"|"rw"}}``.
        secrets: environment the job needs beyond its own settings (the MLflow login of a job that logs itself).
    """
    gpus = list(node.gpus)
    env = {"OMP_NUM_THREADS": str(threads_per_proc), "PYTHONUNBUFFERED": "1", "HOME": "/tmp",
           # The engine exposes exactly the leased GPUs, renumbered from 0; none at all without a lease, even
           # where the NVIDIA runtime is the default and the image says NVIDIA_VISIBLE_DEVICES=all.
           "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(len(gpus))),
           "NVIDIA_VISIBLE_DEVICES": ",".join(gpus) if gpus else "void", **(secrets or {})}
    kwargs: dict[str, Any] = {
        "image": image, "name": name, "entrypoint": command[:1], "command": command[1:], "user": user,
        "environment": env, "labels": labels, "volumes": volumes, "working_dir": workdir,
        "shm_size": spec.shm_size, "init": True, "privileged": False, "cap_drop": ["ALL"], "pids_limit": PIDS_LIMIT,
        "security_opt": ["no-new-privileges"], "read_only": True, "tmpfs": {"/tmp": "rw,exec,nosuid,nodev"},
    }
    if spec.network == "host":
        kwargs["network_mode"] = "host"
    else:
        kwargs.update(network=network, hostname=name)
    if gpus:
        kwargs["device_requests"] = [DeviceRequest(device_ids=gpus, capabilities=[["gpu"]])]
    if node.cpus:
        kwargs["cpuset_cpus"] = node.cpuset()
    if node.memory:
        kwargs.update(mem_limit=node.memory, memswap_limit=node.memory)  # no swap beyond the lease
    if spec.ulimits:
        kwargs["ulimits"] = [Ulimit(name=k, soft=soft, hard=hard) for k, (soft, hard) in sorted(spec.ulimits.items())]
    return kwargs


def bind_volumes(config: TrainConfig, workdir: Path) -> dict[str, dict[str, str]]:
    """Bind mounts at the same absolute paths: the run's features (and the raw snapshot, for a loop that builds
    its own features) read-only, its outputs and checkpoints read-write, the work folder (config file) read-only;
    nothing else of kiln's home (its databases, the lease store, other runs). The pipeline's code is in the user
    image, not mounted. A path under a mount of the same mode is left out; the same path twice is read-write if
    either asks for it. A file-based MLflow store is not mounted: see :func:`containers_can_log`."""
    wanted: list[tuple[str | Path, str]] = [
        (config.features_dir, "ro"), (workdir, "ro"), (config.output_dir, "rw"), (config.checkpoint_dir, "rw"),
        *([(config.raw_snapshot, "ro")] if config.raw_snapshot else [])]
    modes: dict[str, str] = {}
    for path, mode in wanted:
        key = str(Path(path).resolve())
        modes[key] = "rw" if "rw" in (mode, modes.get(key)) else "ro"
    kept: dict[str, str] = {}
    for path in sorted(modes):  # parents sort before their children; the nearest kept one decides
        parent = next((p for p in reversed(kept) if path.startswith(p.rstrip("/") + "/")), None)
        if parent is None or kept[parent] != modes[path]:
            kept[path] = modes[path]
    return {p: {"bind": p, "mode": m} for p, m in kept.items()}


#: The MLflow login variables a job that logs to a tracking server itself is given (nothing else of this
#: process's environment reaches a container).
MLFLOW_LOGIN_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def containers_can_log(uri: str | None, network: str) -> bool:
    """Whether a job's containers can log to the MLflow tracking URI themselves: a tracking server they reach over
    HTTP. A file-based store (SQLite, a file store) lives in kiln's home, which containers must not mount, and a
    server on the host's loopback is out of reach from a bridge network; the launcher logs for them then."""
    if not uri or not uri.startswith(("http://", "https://")):
        return False
    host = (urlsplit(uri).hostname or "").lower()
    return network == "host" or not (host == "localhost" or host.startswith("127.") or host == "::1")


def container_user(user: str | None) -> str:
    """``uid:gid`` for the containers: the given one, this process's own, or the fallback when running as root."""
    chosen = user or (ROOT_FALLBACK_USER if os.geteuid() == 0 else f"{os.geteuid()}:{os.getegid()}")
    uid, _, gid = chosen.partition(":")
    if not (uid.isdigit() and gid.isdigit()) or int(uid) == 0:
        raise ValueError(f"DockerGangLauncher user must be a non-root 'uid:gid', found {chosen!r}")
    return chosen


def prepare_mount_sources(config: TrainConfig, user: str, workdir: Path) -> None:
    """Create the bind mounts' sources; as root, give the containers' group read on what the job reads and write
    where it writes (the services' umask 077 leaves a task's files to root alone)."""
    for folder in (Path(config.output_dir), Path(config.checkpoint_dir)):
        folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return  # the containers run as this process's own user (or one the caller set up for)
    gid = int(user.partition(":")[2])
    shared = [(Path(config.output_dir), True), (Path(config.checkpoint_dir), True),
              (Path(config.features_dir), False), (workdir, False),
              *([(Path(config.raw_snapshot), False)] if config.raw_snapshot else [])]
    log.info("containers run as %s: giving group %d access to %s", user, gid, ", ".join(str(p) for p, _ in shared))
    for path, write in shared:
        share_with_group(path, gid, recursive=True, write=write)


def share_with_group(path: Path, gid: int, *, recursive: bool, write: bool = True) -> None:
    """Give group ``gid`` read (and write, unless not ``write``; search on folders) on ``path``, and below it when
    ``recursive``: what a service's umask 077 kept from everyone else."""
    for p in [path, *(path.rglob("*") if recursive and path.is_dir() else ())]:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        if st.st_gid != gid:
            os.chown(p, -1, gid)
        bits = stat.S_IRGRP | (stat.S_IWGRP if write else 0) | (stat.S_IXGRP if stat.S_ISDIR(st.st_mode) else 0)
        if st.st_mode & bits != bits:
            os.chmod(p, stat.S_IMODE(st.st_mode) | bits)


def describe_refusal(node: NodeAllocation, exc: DockerException) -> str:
    """What the engine refused, in words, with the fix."""
    text = str(getattr(exc, "explanation", None) or exc)
    engine = node.docker_url or "the local Docker engine"
    if "could not select device driver" in text:
        return (f"{engine} has no GPU runtime ({text}); install the NVIDIA Container Toolkit on that node and "
                "register it with Docker (nvidia-ctk runtime configure --runtime=docker), or lease no GPUs "
                "(training.resources.gpus: 0)")
    if "rlimit" in text:
        return (f"{engine} may not raise a ulimit above the host's hard limit ({text}); lower "
                "training.docker.ulimits to at most the host's hard limits, or run dockerd with CAP_SYS_RESOURCE")
    if isinstance(exc, ImageNotFound) or "No such image" in text:
        return f"{engine} has no image ({text}); build it with `make image` or pull it onto that node"
    return f"{engine} refused the container: {text}"
