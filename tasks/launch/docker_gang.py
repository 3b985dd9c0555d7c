"""The ``docker`` launcher: a training job as a gang of containers, one per leased node, each running torchrun.

The gang starts together (every container is created before any is started), dies together (the first non-zero
exit kills the others at once) and comes back together: up to ``training.max_restarts`` times the whole gang is
started again, and ``kiln.tasks.training.loop`` resumes from the last complete checkpoint (never after
:meth:`~DockerGangLauncher.preempt`, which stops every container with a grace period to checkpoint first).
``training.timeout_s`` bounds the whole job, restarts included. The run's data, outputs and checkpoints (and nothing
else of kiln's home) are bind-mounted at the same absolute paths, so a run writes exactly where
:class:`kiln.tasks.launch.torchrun.LocalTorchrunLauncher` would. What each container is made of (command, devices,
mounts, the nodes of a lease) is in :mod:`kiln.tasks.launch.containers`, what is done to a running one in
:mod:`kiln.tasks.launch.container_control`; this module drives the gang.

A job with the pipeline's own code or requirements runs an image built FROM the base for it
(:mod:`kiln.tasks.launch.user_image`, cached by content hash); its containers find the code at
:data:`~kiln.tasks.launch.user_image.USER_CODE_DIR` in the image, not mounted from this host.

Every container and network carries the label ``kiln.job=<id>`` and is removed on every path out of
:meth:`DockerGangLauncher.launch`, including a refused start (the engine keeps a created container whose start
failed, e.g. for a GPU request on a host without a GPU runtime); should this process die by SIGKILL, its watchdog
removes them (:mod:`kiln.tasks.launch.container_reaper`).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from docker.client import DockerClient
from docker.errors import DockerException, ImageNotFound
from docker.models.containers import Container
from docker.utils import kwargs_from_env

from kiln.tasks.launch import container_control
from kiln.tasks.launch.base import (
    LOG_FILE,
    Launcher,
    LaunchResult,
    TrainingFailedError,
    TrainingTimeoutError,
    refused_launch,
)
from kiln.tasks.launch.container_control import KILLED_EXIT, kill_all, remove_all
from kiln.tasks.launch.container_reaper import engine_client, owner_label, remove_job, start_watchdog, sweep_orphans
from kiln.tasks.launch.containers import (
    JOB_LABEL,
    MLFLOW_LOGIN_VARIABLES,
    OWNER_LABEL,
    RDZV_PORT,
    bind_volumes,
    container_kwargs,
    container_user,
    containers_can_log,
    describe_refusal,
    gang_nodes,
    prepare_mount_sources,
    torchrun_command,
)
from kiln.tasks.launch.user_image import USER_CODE_DIR, ImageBuildError, ensure_user_image
from kiln.tasks.pools.allocation import Allocation, NodeAllocation, format_size
from kiln.tasks.processes import OutputLog
from kiln.tasks.settings import get_settings
from kiln.tasks.storage.artifacts import atomic_write_bytes
from kiln.tasks.training.job import CONFIG_FILE, METRICS_FILE, TrainConfig
from kiln.tasks.training.mlflow_logging import relay_to_mlflow

log = logging.getLogger(__name__)

#: Exit code for a job the engine refused to start (``docker run`` uses 125 for daemon errors).
ENGINE_ERROR_EXIT = 125


class ContainerStartError(TrainingFailedError):
    """The Docker engine refused to create or start a container of the gang; nothing of the job is left behind.

    ``node`` names the node, ``cause`` says what the engine refused and how to fix it.
    """

    def __init__(self, node: str, cause: str, log_tail: str = ""):
        self.node = node
        self.cause = cause
        super().__init__(ENGINE_ERROR_EXIT, log_tail, reason=f"could not start on node {node}: {cause}")


@dataclass(frozen=True)
class _Outcome:
    """How one attempt of the gang ended."""

    status: Literal["ok", "failed", "timeout", "terminated", "preempted"]
    node: str = ""
    exit_code: int = 0
    detail: str = ""


class DockerGangLauncher(Launcher):
    """Runs a training job as one container per leased node (``torchrun --nnodes=N``, c10d rendezvous).

    Networking follows ``training.docker.network``: ``bridge`` creates a private network per job on the one Docker
    engine that hosts every node, and the nodes meet at the rank-0 container's name; ``host`` uses the nodes'
    own networks and addresses (a gang across several Docker hosts). The containers run as a non-root
    ``uid:gid`` with every capability dropped, a read-only root filesystem and a tmpfs ``/tmp``. Each node's
    engine is ``NodeAllocation.docker_url`` (TLS settings from the docker SDK's ``DOCKER_TLS_VERIFY`` and
    ``DOCKER_CERT_PATH``), or the default engine when it is ``None``.

    Args:
        user: ``uid:gid`` for the containers. Default: this process's own; when it runs as root,
            :data:`ROOT_FALLBACK_USER`, and the job's output and checkpoint folders get read/write for that
            group.
        rdzv_port: the c10d rendezvous port on the rank-0 node.
        tail_lines: output lines kept for the result and the errors.
    """

    def __init__(self, *, user: str | None = None, rdzv_port: int = RDZV_PORT, tail_lines: int = 100):
        self.user = user
        self.rdzv_port = rdzv_port
        self.tail_lines = tail_lines
        self.job_id: str | None = None
        """The running (or last) job's id: the value of the :data:`JOB_LABEL` label on its containers."""
        super().__init__()
        self._containers: list[Container] = []

    def launch(self, config: TrainConfig, *, nproc: int, workdir: Path,
               allocation: Allocation | None = None) -> LaunchResult:
        """Run the gang to completion (see :meth:`Launcher.launch`).

        Raises:
            ValueError: a lease that does not fit the config (node count, GPUs per rank, bridge across engines).
            RequirementError: a line of ``code.requirements`` pip cannot install into the image.
            UserCodeError: the code folder is unusable (too large, a link out of it, changed since configured).
            ContainerStartError: an engine is unreachable, lacks the image, could not build the user image, or
                refused a container (no GPU runtime, a ulimit above the host's hard limit, unknown CPU cores); no
                restart is tried.
            TrainingFailedError: a node exited non-zero after ``max_restarts`` restarts, or :meth:`terminate`.
            TrainingTimeoutError: the job, restarts included, ran past ``training.timeout_s``.
        """
        t = config.training
        nodes = gang_nodes(config, nproc, allocation)
        user = container_user(self.user)
        workdir = Path(workdir).resolve()
        # Where the containers cannot reach the tracking store (files in kiln's home, a server on this host's
        # loopback), they log nothing and this process logs the finished job's epochs for them.
        relay = None
        if config.mlflow_run_id and not containers_can_log(config.mlflow_tracking_uri, t.docker.network):
            relay, config = config, replace(config, mlflow_tracking_uri=None, mlflow_run_id=None)
        code_dir, requirements = config.code_dir, list(config.requirements)
        if code_dir:
            config = replace(config, code_dir=USER_CODE_DIR)  # the user image holds the code there
        atomic_write_bytes(workdir / CONFIG_FILE, config.to_json().encode())
        prepare_mount_sources(config, user, workdir)
        with self._lock:
            if self._terminated:
                raise refused_launch(self._preemption)
            job = self.job_id = uuid.uuid4().hex[:12]
        base = t.docker.image or get_settings().train_image
        sink = OutputLog(workdir / LOG_FILE, self.tail_lines, on_line=self._log_line)
        clients: dict[str | None, DockerClient] = {}
        reaper = start_watchdog(job, sorted({n.docker_url or "" for n in nodes}))
        try:
            for n in nodes:
                if n.docker_url not in clients:
                    clients[n.docker_url] = _connect(n, pool_size=2 * len(nodes) + 4)
                    sweep_orphans(clients[n.docker_url])
            images = _images(clients, nodes, base, code_dir, requirements, config.code_hash, sink)
            for n in nodes:
                _check_image(clients[n.docker_url], n, images[n.docker_url])
            image = ", ".join(sorted(set(images.values())))
            # training.timeout_s bounds the training, not an image build (which has its own bound).
            start = time.monotonic()
            if t.docker.network == "bridge":
                try:
                    clients[nodes[0].docker_url].networks.create(f"kiln-{job}", driver="bridge",
                                                                 labels={JOB_LABEL: job})
                except DockerException as exc:
                    raise ContainerStartError(nodes[0].node, describe_refusal(nodes[0], exc)) from exc
            log.info("job %s: %d node(s) x %d rank(s), image %s, user %s, network %s, timeout %d s", job, len(nodes),
                     nproc, image, user, t.docker.network, t.timeout_s)
            for attempt in range(t.max_restarts + 1):
                kwargs = self._gang(config, nodes, nproc, job, attempt, images=images, user=user, workdir=workdir)
                outcome = self._run_attempt(clients, nodes, kwargs, sink, deadline=start + t.timeout_s)
                if outcome.status == "ok":
                    if relay is not None:
                        epochs = relay_to_mlflow(relay, Path(config.output_dir) / METRICS_FILE)
                        log.info("logged %d epoch(s) of job %s to MLflow run %s", epochs, job, relay.mlflow_run_id)
                    duration = time.monotonic() - start
                    log.info("job %s finished in %.1f s", job, duration)
                    return LaunchResult(exit_code=0, duration_s=duration, log_tail="\n".join(sink.tail))
                if outcome.status != "failed" or attempt == t.max_restarts:
                    raise self._error(outcome, t.timeout_s, attempt, "\n".join(sink.tail))
                sink.write(f"[launcher] node {outcome.node} {outcome.detail}; restarting the gang from its last "
                           f"checkpoint (restart {attempt + 1} of {t.max_restarts})")
            raise AssertionError("unreachable: the last attempt returns or raises")
        finally:
            self._clean_up(clients, job)
            reaper.stop(grace_s=1, what="container watchdog")
            sink.close()

    def terminate(self) -> None:
        with self._lock:
            self._terminated = True
            containers = list(self._containers)
        kill_all(containers)

    def _stop_within(self, grace_s: float) -> bool:
        with self._lock:
            containers = list(self._containers)
        return container_control.stop_all(containers, grace_s)

    def _gang(self, config: TrainConfig, nodes: tuple[NodeAllocation, ...], nproc: int, job: str, attempt: int, *,
              images: dict[str | None, str], user: str, workdir: Path) -> list[dict[str, Any]]:
        """The create arguments of every container of one attempt (fresh names, a fresh rendezvous id)."""
        t = config.training
        bridge = t.docker.network == "bridge"
        login = {k: os.environ[k] for k in MLFLOW_LOGIN_VARIABLES if k in os.environ and config.mlflow_run_id}
        names = [f"kiln-{job}-{i:02d}" + (f"-r{attempt}" if attempt else "") for i in range(len(nodes))]
        endpoint = f"{names[0] if bridge else nodes[0].address}:{self.rdzv_port}"
        return [container_kwargs(
            n, t.docker, image=images[n.docker_url], name=name, network=f"kiln-{job}", user=user,
            command=torchrun_command(nnodes=len(nodes), nproc=nproc, rdzv_endpoint=endpoint, rdzv_id=f"{job}-{attempt}",
                                     config_path=str(workdir / CONFIG_FILE), local_addr=None if bridge else n.address,
                                     shutdown_timeout_s=t.timeout_s),
            volumes=bind_volumes(config, workdir),
            labels={JOB_LABEL: job, "kiln.node": n.node, OWNER_LABEL: owner_label()},
            threads_per_proc=t.threads_per_proc, workdir=str(workdir), secrets=login)
            for n, name in zip(nodes, names, strict=True)]

    def _run_attempt(self, clients: dict[str | None, DockerClient], nodes: tuple[NodeAllocation, ...],
                     kwargs: list[dict[str, Any]], sink: OutputLog, deadline: float) -> _Outcome:
        """Create every container, then start them all, watch them, and remove them (on every path)."""
        with self._lock:
            self._containers = []
        try:
            for n, kw in zip(nodes, kwargs, strict=True):
                try:
                    container = clients[n.docker_url].containers.create(**kw)
                except DockerException as exc:
                    raise ContainerStartError(n.node, describe_refusal(n, exc), "\n".join(sink.tail)) from exc
                with self._lock:
                    self._containers.append(container)
            if self._terminated:
                if self._preemption is not None:
                    return _Outcome("preempted", exit_code=-15, detail="was preempted before it started")
                return _Outcome("terminated", exit_code=-15)
            # Side by side: the rendezvous waits for the last member, and a terminate() that comes while they
            # start is caught by _watch, which kills whatever did start.
            with ThreadPoolExecutor(len(nodes)) as pool:
                refusals = list(pool.map(container_control.start, self._containers))
            for n, refusal in zip(nodes, refusals, strict=True):
                if refusal is not None:
                    raise ContainerStartError(n.node, describe_refusal(n, refusal), "\n".join(sink.tail)) from refusal
            events: queue.Queue[tuple[int, int]] = queue.Queue()
            pumps = [threading.Thread(target=container_control.stream_logs, args=(c, n.node, sink), daemon=True)
                     for n, c in zip(nodes, self._containers, strict=True)]
            for i, (pump, container) in enumerate(zip(pumps, self._containers, strict=True)):
                pump.start()
                threading.Thread(target=container_control.report_exit, args=(container, i, events),
                                 daemon=True).start()
            outcome = self._watch(nodes, events, deadline)
            if outcome.status != "ok":
                kill_all(self._containers)  # the whole gang at once: peers of a dead rank would hang
                outcome = _explain(outcome, nodes, self._containers)
            for pump in pumps:
                pump.join(timeout=5)  # the rest of the output, for the error's tail
            return outcome
        finally:
            remove_all(self._containers)

    def _watch(self, nodes: tuple[NodeAllocation, ...], events: queue.Queue[tuple[int, int]],
               deadline: float) -> _Outcome:
        """Wait until every container exited 0, or the first one failed, or the deadline, terminate() or preempt()
        came."""
        pending = set(range(len(nodes)))
        while pending:
            remaining = deadline - time.monotonic()
            if self._preemption is not None:
                return self._preempted(pending, events)
            if self._terminated:
                return _Outcome("terminated", exit_code=-15)
            if remaining <= 0:
                return _Outcome("timeout", exit_code=KILLED_EXIT)
            try:
                index, code = events.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if code != 0 and self._preemption is not None:
                return self._preempted(pending - {index}, events, code)
            if code != 0:
                status: Literal["failed", "terminated"] = "terminated" if self._terminated else "failed"
                return _Outcome(status, nodes[index].node, code, f"exited with code {code}")
            pending.discard(index)
        return _Outcome("ok")

    def _preempted(self, pending: set[int], events: queue.Queue[tuple[int, int]], code: int = 0) -> _Outcome:
        """The gang's end once preempt() came: every container exited (0 each: it finished meanwhile) or stopped."""
        assert self._preemption is not None
        self._preemption.done.wait()  # stop_all() returns once every container it stopped has exited
        codes = [code]
        while pending:
            try:
                index, code = events.get(timeout=5)
            except queue.Empty:
                # Started after preempt() stopped the others (a start racing the preemption): no grace for it.
                kill_all([self._containers[i] for i in pending])
                self._preemption.killed = True
                return _Outcome("preempted", exit_code=KILLED_EXIT)
            codes.append(code)
            pending.discard(index)
        failed = [c for c in codes if c != 0]
        return _Outcome("preempted", exit_code=failed[0]) if failed else _Outcome("ok")

    def _log_line(self, text: str) -> None:
        log.info("%s", text)
        self._output(text)

    def _error(self, outcome: _Outcome, timeout_s: int, restarts: int, tail: str) -> TrainingFailedError:
        if outcome.status == "preempted":
            assert self._preemption is not None
            return self._preemption.error(outcome.exit_code, tail, reason=outcome.detail or None)
        if outcome.status == "timeout":
            log.error("training job ran past its %d s timeout; killed every container", timeout_s)
            return TrainingTimeoutError(timeout_s, outcome.exit_code, tail)
        if outcome.status == "terminated":
            return TrainingFailedError(outcome.exit_code, tail, reason="was terminated")
        after = f" after {restarts} restart(s)" if restarts else ""
        return TrainingFailedError(outcome.exit_code, tail, reason=f"failed{after}: node {outcome.node} "
                                                                   f"{outcome.detail}")

    def _clean_up(self, clients: dict[str | None, DockerClient], job: str) -> None:
        """Remove whatever of the job is left on every engine (found by label), then close the clients."""
        remove_all(self._containers)
        for url, client in clients.items():
            try:
                remove_job(client, job)
            except (DockerException, OSError) as exc:
                log.warning("could not clean up job %s on %s (find leftovers with label %s=%s): %s", job,
                            url or "the local engine", JOB_LABEL, job, exc)
            finally:
                client.close()


def _connect(node: NodeAllocation, *, pool_size: int) -> DockerClient:
    """A client for the node's engine; TLS and the default endpoint come from the docker SDK's environment."""
    where = node.docker_url or kwargs_from_env().get("base_url") or "the default Docker socket"
    try:
        client = engine_client(node.docker_url or "", max_pool_size=pool_size)
        client.ping()
    except DockerException as exc:
        raise ContainerStartError(node.node, f"cannot reach the Docker engine at {where} ({exc}); start it (on a "
                                             "dev machine: make docker-engine) or fix the node's docker_url in the "
                                             "pool inventory") from exc
    return client


def _images(clients: dict[str | None, DockerClient], nodes: tuple[NodeAllocation, ...], base: str,
            code_dir: str | None, requirements: list[str], code_hash: str | None,
            sink: OutputLog) -> dict[str | None, str]:
    """The image each engine runs: the base, or (with the pipeline's code or requirements) the user image built
    FROM it on that engine.

    Raises:
        RequirementError, UserCodeError: a requirement pip cannot install, an unusable code folder.
        ContainerStartError: the engine could not build the image.
    """
    if not code_dir and not requirements:
        return {url: base for url in clients}
    images = {}
    for url, client in clients.items():
        node = next(n for n in nodes if n.docker_url == url)
        try:
            built = ensure_user_image(client, base, code_dir=code_dir, requirements=requirements,
                                      code_sha256=code_hash)
        except ImageBuildError as exc:
            raise ContainerStartError(node.node, str(exc), "\n".join(sink.tail)) from exc
        sink.write(f"[launcher] {'built' if built.built else 'reusing'} image {built.tag} on "
                   f"{url or 'the local engine'} (FROM {base}; {len(requirements)} requirement(s)"
                   f"{', code at ' + USER_CODE_DIR if code_dir else ''})")
        images[url] = built.tag
    return images


def _check_image(client: DockerClient, node: NodeAllocation, image: str) -> None:
    try:
        client.images.get(image)
    except ImageNotFound as exc:
        raise ContainerStartError(node.node, describe_refusal(node, exc)) from exc


def _explain(outcome: _Outcome, nodes: tuple[NodeAllocation, ...], containers: list[Container]) -> _Outcome:
    """Name an out-of-memory kill: the engine records it, the exit code (137) alone does not say it."""
    index = [n.node for n in nodes].index(outcome.node) if outcome.status == "failed" else -1
    if not 0 <= index < len(containers):
        return outcome
    try:
        containers[index].reload()
    except (DockerException, OSError):
        return outcome
    if not containers[index].attrs["State"].get("OOMKilled"):
        return outcome
    limit = format_size(nodes[index].memory) if nodes[index].memory else "the host's memory"
    return replace(outcome, detail=f"was killed by the kernel OOM killer at its memory limit ({limit}); lease more "
                                   "memory (training.resources.memory)")
