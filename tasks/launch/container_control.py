"""What :class:`kiln.tasks.launch.docker_gang.DockerGangLauncher` does to the running containers of a gang: start them,
stream their logs, report their exits, stop, kill and remove them. Each call tolerates a container that is gone
already (exited, removed, or its engine unreachable): the gang is being taken down then anyway.
"""

from __future__ import annotations

import logging
import math
import queue
from concurrent.futures import ThreadPoolExecutor

from docker.errors import APIError, DockerException, NotFound
from docker.models.containers import Container

from kiln.tasks.processes import OutputLog

log = logging.getLogger(__name__)

#: A container's exit code once the engine killed its init with SIGKILL (128 + 9).
KILLED_EXIT = 137


def start(container: Container) -> DockerException | None:
    """Start a created container; the engine's refusal is returned (raised by the caller, once all are done)."""
    try:
        container.start()
    except DockerException as exc:
        return exc
    return None


def stream_logs(container: Container, source: str, output: OutputLog) -> None:
    """Copy one container's log to ``output``, line by line as ``[source] line``, until it exits (the engine
    sends chunks, not lines)."""
    pending = b""
    try:
        for chunk in container.logs(stream=True, follow=True):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").rstrip("\r")
                output.write(f"[{source}] {line}")
    except (DockerException, OSError):
        pass  # the container was removed while streaming
    if pending:
        output.write(f"[{source}] {pending.decode(errors='replace')}")


def report_exit(container: Container, index: int, events: queue.Queue[tuple[int, int]]) -> None:
    """Put ``(index, exit code)`` on ``events`` once the container exited (-1 when it was removed or the engine
    went away)."""
    try:
        code = int(container.wait()["StatusCode"])
    except (DockerException, OSError):
        code = -1
    events.put((index, code))


def stop_all(containers: list[Container], grace_s: float) -> bool:
    """Stop the containers side by side: SIGTERM to each one's init, which forwards it to torchrun and torchrun to
    its ranks; SIGKILL after ``grace_s`` (whole seconds, rounded up). Returns once all have stopped, and whether
    any had to be killed."""
    if not containers:
        return False
    with ThreadPoolExecutor(len(containers)) as pool:
        return any(pool.map(lambda c: _stop(c, math.ceil(grace_s)), containers))


def _stop(container: Container, timeout_s: int) -> bool:
    try:
        container.stop(timeout=timeout_s)
        container.reload()
    except (DockerException, OSError):
        return False  # removed meanwhile: the launcher took the gang down
    return int(container.attrs["State"].get("ExitCode", 0)) == KILLED_EXIT


def kill_all(containers: list[Container]) -> None:
    for container in containers:
        try:
            container.kill()
        except (DockerException, OSError):
            pass  # already exited or removed


def remove_all(containers: list[Container]) -> None:
    for container in containers:
        try:
            container.remove(force=True)
        except NotFound:
            pass
        except (APIError, OSError) as exc:
            log.warning("could not remove container %s: %s", container.name, exc)
