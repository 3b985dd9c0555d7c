"""Replicas as containers of the serve image (``replicas.image``), on the engine of the pool node they leased.

Each container runs ``python -m kiln.tasks.serving`` (the image's entrypoint) on the node's host network, on a port
the fleet picked, pinned to the leased cores (``cpuset``) and capped at the leased memory. It reads its set's
deployment file and the bundles at the paths they have on this host, mounted read-only, and gets the token through
its environment. It runs as this process's user (as root: the training containers' fallback user, with the
container's group given read on what it mounts), read-only, with no capabilities.

Containers never outlive the fleet, by the training launcher's mechanism (:mod:`kiln.tasks.launch.container_reaper`):
each is labelled with the fleet's job and owner; a watchdog beside the fleet removes them when the fleet is gone,
and every fleet start sweeps the containers of fleets on this host that no longer run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from docker.errors import DockerException, NotFound

from kiln.tasks.launch.container_reaper import engine_client, owner_label, start_watchdog, sweep_orphans
from kiln.tasks.launch.containers import JOB_LABEL, OWNER_LABEL, container_user, share_with_group
from kiln.tasks.pools.allocation import Allocation
from kiln.tasks.processes import ProcessGroup

log = logging.getLogger(__name__)


class ContainerReplica:
    """A replica's container, with the part of :class:`~kiln.tasks.processes.ProcessGroup`'s interface the fleet
    uses: ``pid`` (the server's pid on the node), :meth:`poll` and :meth:`stop`."""

    def __init__(self, container: Any, log_file: Path):
        self.container, self.log_file = container, log_file
        container.reload()
        self.pid = int(container.attrs["State"].get("Pid") or -1)
        self._exit: int | None = None

    def poll(self) -> int | None:
        """The exit code once the container stopped (or was removed), else ``None``."""
        if self._exit is not None:
            return self._exit
        try:
            self.container.reload()
        except NotFound:
            self._exit = -9
            return self._exit
        except DockerException:
            return None  # the engine busy: asked again at the next pass
        state = self.container.attrs["State"]
        if state.get("Running"):
            return None
        self._exit = int(state.get("ExitCode", -1))
        try:  # its output, for the fleet's report of why it ended
            with self.log_file.open("ab") as out:
                out.write(self.container.logs(tail=50))
        except (DockerException, OSError) as exc:
            log.warning("could not read the output of container %s: %s", self.container.name, exc)
        return self._exit

    def stop(self, grace_s: float, what: str = "container") -> list[int]:
        """SIGTERM (in-flight requests finish), SIGKILL after ``grace_s``, then remove it."""
        try:
            self.container.stop(timeout=max(1, int(grace_s)))
            self.container.remove(force=True)
        except NotFound:
            pass
        except DockerException as exc:
            log.warning("could not stop %s (%s): %s", what, self.container.name, exc)
        return []


class ContainerEngines:
    """The engines a fleet's containers run on, their cleanup watchdog, and how a replica is started there.

    Args:
        image: the serve image.
        job: the fleet's job label (``kiln.job``): every container of the fleet carries it.
    """

    def __init__(self, image: str, job: str):
        self.image, self.job = image, job
        self.user = container_user(None)
        self._clients: dict[str, Any] = {}
        self._watchdog: ProcessGroup | None = None

    def client(self, url: str | None) -> Any:
        key = url or ""
        if key not in self._clients:
            client = engine_client(key)
            sweep_orphans(client)  # containers of fleets (and jobs) on this host that no longer run
            self._clients[key] = client
            if self._watchdog is not None:
                self._watchdog.stop(grace_s=2, what="container watchdog")
            self._watchdog = start_watchdog(self.job, sorted(self._clients))
        return self._clients[key]

    def start(self, slot: int, lease: Allocation, *, command: list[str], env: dict[str, str],
              mounts: list[Path], log_file: Path) -> ContainerReplica:
        """Run a replica's container on the lease's node.

        Raises:
            DockerException: the engine refused it (the image missing, the cores out of range).
        """
        node = lease.master
        client = self.client(node.docker_url)
        if os.geteuid() == 0:  # the services' umask 077 leaves files to root alone
            for path in mounts:
                share_with_group(path, int(self.user.partition(":")[2]), recursive=True, write=False)
        kwargs: dict[str, Any] = {
            "image": self.image, "command": command, "detach": True, "network_mode": "host", "user": self.user,
            "environment": env, "init": True, "read_only": True, "tmpfs": {"/tmp": "rw,exec,nosuid,nodev"},
            "cap_drop": ["ALL"], "security_opt": ["no-new-privileges"],
            "name": f"{self.job}-r{slot}-{lease.lease_id[:8]}",
            "labels": {JOB_LABEL: self.job, OWNER_LABEL: owner_label(), "kiln.replica": f"r{slot}"},
            "volumes": {str(p): {"bind": str(p), "mode": "ro"} for p in mounts}}
        if node.cpus:
            kwargs["cpuset_cpus"] = node.cpuset()
        if node.memory:
            kwargs.update(mem_limit=node.memory, memswap_limit=node.memory)
        return ContainerReplica(client.containers.run(**kwargs), log_file)

    def close(self) -> None:
        """Stop the watchdog (after the fleet removed its containers) and close the clients."""
        if self._watchdog is not None:
            self._watchdog.stop(grace_s=2, what="container watchdog")
        for client in self._clients.values():
            client.close()
