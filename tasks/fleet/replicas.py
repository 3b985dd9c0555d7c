"""The replicas of a fleet: what each one serves, how it is started, and the balancer weights of the two sets.

A replica is a kiln model server (``python -m kiln.tasks.serving``) on a loopback port, pinned to its leased
cores. It belongs to one of two sets:

- **champion** replicas serve the deployment without its canary (``sets/champion.json``);
- the **canary** replica (one, while the deployment has a canary) serves the deployment with the canary's share at
  1 (``sets/canary.json``): every request it gets is the canary's, still labelled ``canary`` in answers,
  ``/admin/stats`` and captures, and a canary failure still falls back to the champion it holds too.

The canary's share of the traffic is then the balancer's weights across the two sets (:func:`set_weights`), so
a rollback or a promotion moves weights and drains a replica instead of touching a request in flight.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from kiln.tasks.fleet.containers import ContainerEngines, ContainerReplica
from kiln.tasks.pools.allocation import Allocation
from kiln.tasks.processes import ProcessGroup, free_port, start_process
from kiln.tasks.serving.deployment import Canary, Deployment, write_deployment

log = logging.getLogger(__name__)

Role = Literal["champion", "canary"]
#: The sum of the weights across the two sets (HAProxy takes 0..256 per server).
WEIGHT_TOTAL = 256


@dataclass
class Replica:
    """One model-server process of the set."""

    slot: int
    role: Role
    address: str
    port: int
    proc: ProcessGroup | ContainerReplica
    lease: Allocation
    """The lease of its cores."""
    state: str = "starting"
    """``starting`` (loading its models), ``ready`` (in rotation) or ``draining`` (leaving it)."""
    since: float = 0.0
    deadline: float = 0.0
    """When a start or a drain is given up."""
    log_offset: int = 0
    """Where this process's output starts in its slot's log file."""

    def to_dict(self) -> dict[str, Any]:
        return {"slot": self.slot, "role": self.role, "address": self.address, "port": self.port,
                "pid": self.proc.pid, "state": self.state, "cpus": list(self.lease.master.cpus),
                "lease": self.lease.lease_id, "container": isinstance(self.proc, ContainerReplica)}

    @property
    def url(self) -> str:
        """The replica's own base URL (not through the balancer)."""
        return f"http://{self.address}:{self.port}"


#: The folder of the sets' deployment files in the run folder (a folder, so that a container that mounts it sees
#: each file replaced atomically; a file mount would keep the replaced file).
SETS_DIR = "sets"


def role_file(run_dir: Path, role: Role) -> Path:
    """The deployment file the replicas of ``role`` serve."""
    return run_dir / SETS_DIR / f"{role}.json"


def write_role_files(run_dir: Path, deployment: Deployment) -> None:
    """Write what each set serves (see the module docstring); the canary's file only while there is a canary."""
    (run_dir / SETS_DIR).mkdir(exist_ok=True)
    write_deployment(role_file(run_dir, "champion"), replace(deployment, canary=None, replicas=None))
    if deployment.canary is not None:
        canary = Canary(deployment.canary.version, deployment.canary.bundle, 1.0)
        write_deployment(role_file(run_dir, "canary"), replace(deployment, canary=canary, replicas=None))


def expected_version(deployment: Deployment, role: Role) -> str | None:
    """The version a ready replica of ``role`` must answer for (``None``: the role has nothing to serve)."""
    if role == "canary":
        return deployment.canary.version if deployment.canary is not None else None
    return deployment.champion.version


def weights(share: float, champions: int, canaries: int) -> tuple[int, int]:
    """Per-server weights ``(champion, canary)`` that send ``share`` of the requests to the canary set.

    Without a ready replica in a set, the other set takes everything. Each weight is at least 1 where its set has
    a share at all (a weight of 0 would take a server out of rotation)."""
    if canaries == 0 or share <= 0:
        return WEIGHT_TOTAL // max(champions, 1) or 1, 0
    if champions == 0 or share >= 1:
        return 0, WEIGHT_TOTAL // canaries or 1
    return (max(1, round(WEIGHT_TOTAL * (1 - share) / champions)), max(1, round(WEIGHT_TOTAL * share / canaries)))


def start_replica(slot: int, role: Role, lease: Allocation, *, run_dir: Path, token: str, threads: int,
                  extra_args: list[str], engines: ContainerEngines | None = None, bundles: tuple[Path, ...] = ()
                  ) -> tuple[ProcessGroup | ContainerReplica, str, int, int]:
    """Start a model server of ``role`` in ``slot`` on the lease's node and cores, dying with this process: a
    process here, or with ``engines`` a container of their image (:mod:`.containers`).

    Args:
        bundles: the folders holding the bundles the deployments name (a container mounts them read-only).

    Returns:
        The process (or container), the address and port it serves on, and where its output starts in the slot's
        log file.

    Raises:
        OSError, DockerException: it could not be started.
    """
    from kiln.tasks.serving.process import server_environment

    port = free_port()
    log_file = run_dir / f"replica-r{slot}.log"
    offset = log_file.stat().st_size if log_file.exists() else 0
    # A process serves on this host's loopback; a container on its node's address (the host network).
    address = lease.master.address if engines is not None else "127.0.0.1"
    args = ["--deployment", str(role_file(run_dir, role)), "--host", address, "--port", str(port),
            "--threads", str(threads), *extra_args]
    env = {**server_environment(os.environ), "KILN_SERVE_TOKEN": token, "PYTHONUNBUFFERED": "1"}
    proc: ProcessGroup | ContainerReplica
    if engines is not None:
        # The image has its own Python and settings: only the token, and an S3 store's location and keys.
        keep = ("KILN_SERVE_TOKEN", "KILN_ARTIFACT_ROOT", "KILN_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "PYTHONUNBUFFERED")
        proc = engines.start(slot, lease, command=args, env={k: v for k, v in env.items() if k in keep},
                             mounts=[run_dir / SETS_DIR, *bundles], log_file=log_file)
    else:
        proc = start_process([sys.executable, "-m", "kiln.tasks.serving", *args], cwd=run_dir, env=env,
                             output=log_file, cpus=lease.master.cpus, die_with_parent=True)
    log.info("replica r%d (%s) starting: pid %d, %s:%d, cores %s%s", slot, role, proc.pid, address, port,
             list(lease.master.cpus), f", image {engines.image}" if engines is not None else "")
    return proc, address, port, offset
