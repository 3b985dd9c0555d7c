"""Containers of a training job never outlive the process that launched them.

Two parts, because the launcher can die by SIGKILL and then runs no cleanup of its own:

- :func:`watch`, run as ``python -m kiln.tasks.launch.container_reaper``: a small watchdog the Docker launcher
  starts beside each job. It polls its parent; once the parent is gone (re-parented), it removes the job's
  containers and networks by label and exits. The launcher stops it when the job ends normally.
- :func:`sweep_orphans`: run by every launch on each engine it uses, it removes containers and networks whose
  :data:`OWNER_LABEL` names a launcher on this host that no longer runs (the watchdog was killed too, or the
  host rebooted).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from typing import Any

import psutil
from docker.client import DockerClient
from docker.errors import DockerException, NotFound
from docker.utils import kwargs_from_env

from kiln.tasks.launch.containers import JOB_LABEL, OWNER_LABEL
from kiln.tasks.processes import OutputLog, ProcessGroup, start_process

log = logging.getLogger(__name__)

#: How often the watchdog looks whether its parent still runs.
POLL_S = 0.5


def owner_label(pid: int | None = None) -> str:
    """The :data:`OWNER_LABEL` value for a launcher process: ``host/pid/start time`` (the start time tells a
    reused pid apart)."""
    proc = psutil.Process(pid)
    return f"{socket.gethostname()}/{proc.pid}/{proc.create_time():.2f}"


def _owner_gone(label: str) -> bool:
    """Whether the launcher a label names was on this host and runs no more (another host's: never judged)."""
    host, _, rest = label.partition("/")
    pid, _, started = rest.partition("/")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        return f"{psutil.Process(int(pid)).create_time():.2f}" != started
    except psutil.NoSuchProcess:
        return True


def _containers(client: DockerClient, label: str) -> list[dict]:
    """``{"Id", "Names", "Labels"}`` of the containers with ``label``, from one list call: per-container
    lookups would race with a launcher removing them at the same moment."""
    return client.api.containers(all=True, filters={"label": label})


def _name(entry: dict) -> str:
    return (entry.get("Names") or [entry.get("Name") or entry["Id"][:12]])[0].lstrip("/")


def remove_job(client: DockerClient, job: str) -> list[str]:
    """Remove every container and network labelled with ``job``; returns their names."""
    label = f"{JOB_LABEL}={job}"
    removed = []
    for entry in _containers(client, label):
        try:
            client.api.remove_container(entry["Id"], force=True)
            removed.append(_name(entry))
        except NotFound:
            pass  # removed by someone else meanwhile
    for entry in client.api.networks(filters={"label": label}):
        try:
            client.api.remove_network(entry["Id"])
            removed.append(_name(entry))
        except NotFound:
            pass
    return removed


def sweep_orphans(client: DockerClient) -> list[str]:
    """Remove the jobs on ``client``'s engine whose launcher on this host is gone; returns what was removed."""
    orphans = {entry["Labels"].get(JOB_LABEL, "") for entry in _containers(client, OWNER_LABEL)
               if _owner_gone(entry["Labels"].get(OWNER_LABEL, ""))}
    removed = [name for job in sorted(orphans - {""}) for name in remove_job(client, job)]
    if removed:
        log.warning("removed the containers of training jobs whose launcher is gone: %s", ", ".join(removed))
    return removed


def engine_client(url: str, **options: Any) -> DockerClient:
    """A client for the engine at ``url`` ('' is the default one); TLS and the default endpoint come from the docker
    SDK's environment."""
    kwargs = kwargs_from_env()
    if url:
        kwargs["base_url"] = url
    return DockerClient(**kwargs, **options)


def watch(job: str, engines: list[str], parent: int) -> int:
    """Wait while ``parent`` runs; when it is gone, remove the job's containers on every engine. Returns the
    number of things removed (0 when the parent's end came with nothing left)."""
    while os.getppid() == parent:
        time.sleep(POLL_S)
    removed = 0
    for client in (engine_client(url) for url in engines):
        try:
            names = remove_job(client, job)
            removed += len(names)
            if names:
                log.warning("the launcher of training job %s is gone; removed %s", job, ", ".join(names))
        except DockerException as exc:
            log.error("could not remove the containers of job %s (label %s=%s): %s", job, JOB_LABEL, job, exc)
        finally:
            client.close()
    return removed


def start_watchdog(job: str, engines: list[str]) -> ProcessGroup:
    """Start :func:`watch` for ``job`` beside this process (the launcher stops it once the job is cleaned up).

    Args:
        job: the job id.
        engines: the engine URLs the job's containers run on ('' for the local engine).
    """
    cmd = [sys.executable, "-m", "kiln.tasks.launch.container_reaper", "--job", job, "--parent", str(os.getpid()),
           *(f"--engine={url}" for url in engines)]
    return start_process(cmd, output=OutputLog(tail_lines=20, on_line=lambda line: log.info("[watchdog] %s", line)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kiln.tasks.launch.container_reaper",
                                     description="Remove a training job's containers once its launcher is gone.")
    parser.add_argument("--job", required=True, help="the job id (label kiln.job)")
    parser.add_argument("--parent", required=True, type=int, help="the launcher's pid")
    parser.add_argument("--engine", action="append", default=[], help="an engine URL; '' for the local engine")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    watch(args.job, args.engine or [""], args.parent)


if __name__ == "__main__":
    main()
