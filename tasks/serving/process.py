"""The embedded default serving endpoint: one local model-server process per model, detached from its caller.

:func:`ensure_server` makes a server answer on ``host:port`` with the given deployment: a kiln server of the same
model already listening there is told to reload its deployment file; otherwise ``python -m kiln.tasks.serving`` is
started in its own session (so it outlives the step that started it), with its output in ``<run_dir>/server.log``
and its pid in ``<run_dir>/server.pid``. :func:`stop_server` stops the server a pid file names.

The bearer token reaches the server through its environment, never its command line (which any local user can
read with ``ps``).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kiln.tasks.processes import ProcessGroup, alive, start_process, stop_groups, tail
from kiln.tasks.serving.client import READY_POLL_S, ServingClient, ServingError
from kiln.tasks.serving.deployment import Deployment, read_deployment
from kiln.tasks.settings import get_settings
from kiln.tasks.storage.artifacts import atomic_write_bytes

log = logging.getLogger(__name__)

PID_FILE = "server.pid"
#: Environment variables a model server never gets (beside every ``AIRFLOW*`` one): database URLs and logins.
SERVER_WITHHELD = frozenset({"KILN_MLFLOW_TRACKING_URI", "KILN_POOLS_DB_URL", "KILN_POSTGRES_URL",
                             "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                             "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"})
LOG_FILE = "server.log"
#: The module a server process runs; a deployment with ``replicas`` is served by the fleet module instead (its
#: replicas run the server module; :mod:`kiln.tasks.fleet`).
SERVER_MODULE = "kiln.tasks.serving"
FLEET_MODULE = "kiln.tasks.fleet"
#: What the fleet needs beside a server's environment: the lease store its replicas' cores come from.
FLEET_KEEPS = ("KILN_POOLS_DB_URL",)
#: The setting that moves the server to another port; named in the port-conflict error.
PORT_SETTING = "KILN_SERVE_PORT"
#: Timeout of the probes that identify what listens on a port.
PROBE_TIMEOUT_S = 3.0

# Servers started by this process, kept so that they are reaped (no zombies) and waited on properly.
_children: dict[int, ProcessGroup] = {}


class PortInUseError(ServingError):
    """The port is held by something other than a kiln model server of this model."""


class ServerStartError(ServingError):
    """The server process exited, or did not become ready, during start-up. ``log_tail`` holds its output."""

    def __init__(self, message: str, log_tail: str):
        self.log_tail = log_tail
        tail = f"; last output lines:\n{log_tail}" if log_tail.strip() else ""
        super().__init__(f"{message}{tail}")


@dataclass(frozen=True)
class ServerHandle:
    """A running model server."""

    url: str
    pid: int
    """The server's process id; -1 when it was started elsewhere and ``run_dir`` holds no pid file for it."""
    log_file: Path
    deployment: Path


def _connect_host(host: str) -> str:
    """The address to reach a server listening on ``host`` (a wildcard address is reached through loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def server_url(host: str, port: int) -> str:
    """The base URL of a server listening on ``host:port``."""
    connect = _connect_host(host)
    return f"http://[{connect}]:{port}" if ":" in connect else f"http://{connect}:{port}"


def _port_taken(host: str, port: int) -> bool:
    try:
        with socket.create_connection((_connect_host(host), port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _read_pid(run_dir: Path) -> int | None:
    try:
        return int((run_dir / PID_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def ensure_server(deployment: Path, *, host: str, port: int, token: str, run_dir: Path,
                  start_timeout_s: float = 60, port_setting: str = PORT_SETTING,
                  die_with_parent: bool = False) -> ServerHandle:
    """Make a model server answer on ``host:port`` with what ``deployment`` describes.

    Args:
        deployment: the deployment file (JSON) the server serves.
        host: listen address (``Settings.serve_host``).
        port: listen port (``Settings.serve_port``).
        token: bearer token of the server's predict and admin endpoints.
        run_dir: where the server's log and pid file go (e.g. ``<serving_dir>/<model>``).
        start_timeout_s: how long a new server may take to load its models.
        port_setting: the setting that chose ``port`` (a spec's ``deployment.port``, or ``KILN_SERVE_PORT``),
            named in the errors about a port that is taken.
        die_with_parent: a new server dies with this process (a throwaway server of one step, which must not
            outlive a killed task); a served endpoint outlives the step that deployed it.

    Returns:
        The running server; it has loaded the deployment's champion version.

    Raises:
        PortInUseError: the port is held by a foreign listener or by the server of another model.
        ServerStartError: a new server exited or did not become ready in time (the message holds its log tail).
        ServingError: a running server refused the token or could not load the new deployment (it keeps serving
            its old models).
        DeploymentError: the deployment file is missing or invalid.
    """
    deployment = Path(deployment).resolve()
    run_dir = Path(run_dir).resolve()
    dep = read_deployment(deployment)
    run_dir.mkdir(parents=True, exist_ok=True)
    url = server_url(host, port)
    running = _read_pid(run_dir)
    wanted = FLEET_MODULE if dep.replicas is not None else SERVER_MODULE
    if running is not None and _is_server(running) and _module_of(running) not in (None, wanted):
        # One server and a replica set are different processes: switching from one to the other restarts.
        log.warning("model %r switches to %s: restarting its endpoint on port %d",
                    dep.model, "replicas behind a balancer" if dep.replicas else "one server process", port)
        stop_server(run_dir)
    if _port_taken(host, port):
        with ServingClient(url, token, timeout_s=max(PROBE_TIMEOUT_S, start_timeout_s)) as client:
            _reload_running(client, dep, port, start_timeout_s, port_setting)
        return ServerHandle(url=url, pid=_read_pid(run_dir) or -1, log_file=run_dir / LOG_FILE,
                            deployment=deployment)
    return _start(deployment, dep, host=host, port=port, token=token, run_dir=run_dir,
                  start_timeout_s=start_timeout_s, die_with_parent=die_with_parent)


def _describe_listener(port: int) -> str:
    """`` (pid N, deployment F)`` of the local process listening on ``port``, for an error message; ``""`` when it
    cannot be told (another user's process, or a platform where listing sockets needs privileges)."""
    import psutil

    try:
        pid = next((c.pid for c in psutil.net_connections("tcp")
                    if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid), None)
        if pid is None:
            return ""
        cmdline = psutil.Process(pid).cmdline()
    except (psutil.Error, OSError):
        return ""
    served = cmdline[cmdline.index("--deployment") + 1] if "--deployment" in cmdline[:-1] else None
    return f" (pid {pid}, deployment {served})" if served else f" (pid {pid})"


def _reload_running(client: ServingClient, dep: Deployment, port: int, start_timeout_s: float,
                    port_setting: str) -> None:
    """Tell the kiln server of ``dep.model`` listening on ``port`` to reload; refuse anything else there."""
    foreign = (f"port {port} is taken by something that is not the kiln model server of {dep.model!r}; stop it "
               f"or choose another port with the setting {port_setting}")
    with ServingClient(client.url, None, timeout_s=PROBE_TIMEOUT_S) as probe:
        if not probe.health():
            raise PortInUseError(foreign, url=client.url)
        try:
            ready = probe.ready() or probe.wait_ready(start_timeout_s)  # a server still loading its models
        except ServingError as exc:
            raise PortInUseError(f"{foreign} ({exc})", url=client.url) from exc
    if not isinstance(ready, dict) or "model" not in ready:
        raise PortInUseError(foreign, url=client.url)
    if ready["model"] != dep.model:
        raise PortInUseError(f"port {port} is taken by the kiln model server of {ready['model']!r}, not "
                             f"{dep.model!r}; give each model its own port with the setting {port_setting}",
                             url=client.url)
    log.info("model server of %r already answers on %s; reloading its deployment", dep.model, client.url)
    try:
        body = client.reload()
    except ServingError as exc:
        if exc.status == 401:
            raise ServingError(
                f"the model server of {dep.model!r} on port {port}{_describe_listener(port)} refused this kiln's "
                "token: it was started by another kiln home (another checkout or KILN_HOME) or with another "
                "KILN_SERVE_TOKEN; stop it (make serve-stop in the checkout that started it, or kill its pid) or "
                f"serve this one on another port with the setting {port_setting}", url=client.url,
                status=401) from exc
        raise
    served = str(body["champion"]["version"])
    if served != str(dep.champion.version):
        raise ServingError(f"after a reload the server on port {port} serves champion version {served}, not "
                           f"{dep.champion.version}: it reads another deployment file; stop it or use another "
                           f"port ({port_setting})", url=client.url)


def _start(deployment: Path, dep: Deployment, *, host: str, port: int, token: str, run_dir: Path,
           start_timeout_s: float, die_with_parent: bool) -> ServerHandle:
    """Start a detached server process and wait until it serves the deployment's champion."""
    log_file = run_dir / LOG_FILE
    cmd = [sys.executable, "-m", FLEET_MODULE if dep.replicas is not None else SERVER_MODULE,
           "--deployment", str(deployment), "--host", host, "--port", str(port)]
    env = {**server_environment(os.environ), "KILN_SERVE_TOKEN": token, "PYTHONUNBUFFERED": "1"}
    if dep.replicas is not None:
        env.update({k: os.environ[k] for k in FLEET_KEEPS if k in os.environ})
    offset = log_file.stat().st_size if log_file.exists() else 0
    proc = start_process(cmd, cwd=run_dir, env=env, output=log_file, die_with_parent=die_with_parent)
    _children[proc.pid] = proc
    atomic_write_bytes(run_dir / PID_FILE, f"{proc.pid}\n".encode())
    log.info("started model server of %r (pid %d) on %s:%d, log %s", dep.model, proc.pid, host, port, log_file)
    url = server_url(host, port)
    deadline = time.monotonic() + start_timeout_s
    with ServingClient(url, token, timeout_s=PROBE_TIMEOUT_S) as client:
        while True:
            code = proc.poll()
            if code is not None:
                _drop_pid_file(run_dir, proc.pid)
                _children.pop(proc.pid, None)
                raise ServerStartError(f"model server of {dep.model!r} exited with code {code} during start-up "
                                       f"(log {log_file})", tail(log_file, offset=offset))
            ready = client.ready()
            if ready is not None and str(ready["champion"]["version"]) == str(dep.champion.version):
                break
            if time.monotonic() >= deadline:
                proc.stop(grace_s=10, what=f"model server pid {proc.pid}")
                _children.pop(proc.pid, None)
                _drop_pid_file(run_dir, proc.pid)
                raise ServerStartError(f"model server of {dep.model!r} was not ready on {url} within "
                                       f"{start_timeout_s:g} s and was stopped (log {log_file})",
                                       tail(log_file, offset=offset))
            time.sleep(READY_POLL_S)
    log.info("model server of %r ready on %s: champion %s, canary %s", dep.model, url, dep.champion.version,
             dep.canary.version if dep.canary else "none")
    return ServerHandle(url=url, pid=proc.pid, log_file=log_file, deployment=deployment)


def server_environment(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` less what a model server must not hold: Airflow's settings and secrets (``AIRFLOW*``), database
    URLs, the MLflow login and the platform's S3 keys. A server needs its bundle files, its token and, to publish
    captures to an S3 store, S3 keys of its own: ``KILN_SERVE_AWS_ACCESS_KEY_ID``/``..._SECRET_ACCESS_KEY``
    become its ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``. Without them the platform's key id is dropped
    too (a key id without its secret would stop boto3 from trying an instance role or profile).

    Raises:
        ValueError: only one of the two server key variables is set.
    """
    keys = get_settings(env).serve_s3_keys
    out = {k: v for k, v in env.items() if not k.startswith("AIRFLOW") and k not in SERVER_WITHHELD
           and not k.startswith("KILN_SERVE_AWS_")}
    out.pop("AWS_ACCESS_KEY_ID", None)
    if keys is not None:
        out["AWS_ACCESS_KEY_ID"], out["AWS_SECRET_ACCESS_KEY"] = keys
    return out


def _drop_pid_file(run_dir: Path, pid: int) -> None:
    """Remove the pid file if it still names ``pid``: another starter may have replaced it with its own live one."""
    if _read_pid(run_dir) == pid:
        (run_dir / PID_FILE).unlink(missing_ok=True)


def _is_server(pid: int) -> bool:
    """Whether ``pid`` is a live model-server process (not a reused pid of something else)."""
    if not alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust the pid file
    return SERVER_MODULE.encode() in cmdline or FLEET_MODULE.encode() in cmdline


def _module_of(pid: int) -> str | None:
    """The module ``python -m`` runs in process ``pid`` (``None``: not told, e.g. without ``/proc``)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return args[args.index(b"-m") + 1].decode() if b"-m" in args[:-1] else None


def stop_server(run_dir: Path, timeout_s: float = 10) -> bool:
    """Stop the server whose pid ``<run_dir>/server.pid`` holds: SIGTERM, then SIGKILL after ``timeout_s``.

    Args:
        run_dir: the folder :func:`ensure_server` was given.
        timeout_s: grace period for a clean shutdown.

    Returns:
        Whether a running server was stopped (``False``: no pid file, or its process had already exited). The
        pid file is removed either way.
    """
    run_dir = Path(run_dir)
    pid = _read_pid(run_dir)
    if pid is None:
        return False
    try:
        if not _is_server(pid):
            log.info("model server pid %d (from %s) is not running", pid, run_dir / PID_FILE)
            return False
        log.info("stopping model server pid %d", pid)
        child = _children.get(pid)
        # The server leads its own process group: whatever it spawned is stopped with it.
        stop_groups({pid}, grace_s=timeout_s, children=[child] if child else [], what=f"model server pid {pid}")
        return True
    finally:
        if (child := _children.pop(pid, None)) is not None:
            child.poll()  # reap it: a server of this process that exited by itself stays a zombie until then
        (run_dir / PID_FILE).unlink(missing_ok=True)


def stop_servers(serving_dir: Path) -> list[str]:
    """Stop every model server started under ``serving_dir`` (one ``<model>/server.pid`` each).

    Returns:
        The models whose running server was stopped.
    """
    return [pid.parent.name for pid in sorted(Path(serving_dir).glob(f"*/{PID_FILE}")) if stop_server(pid.parent)]
