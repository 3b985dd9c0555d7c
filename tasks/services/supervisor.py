"""Run the platform as services: ``python -m kiln.tasks.services.supervisor up|down|status`` (``make up``).

``up`` migrates the Airflow metadata DB, starts the api-server (UI + REST), scheduler, dag-processor, triggerer,
an MLflow server (where the UI's extra links point), the Celery workers of the ``prod`` profile, and the model
servers of pipelines that have a deployment; waits until every one is healthy; and prints the URL and where the
generated credentials are. The components outlive the command: each runs in its own session (so its own process
group) with its log under ``$KILN_HOME/logs/service/``, and ``$KILN_HOME/run/service.json`` records them for
``down``, which stops every process group and the processes that left one, with no orphans.

``up`` on a partly running set starts only what is dead; what runs keeps its pid. The ``model-servers`` component
(:mod:`.watchdog`) restarts model servers that die. Each component gets only the secrets it needs
(:func:`.environment.component_environment`); what the services write is private (umask 077, and at each ``up``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kiln.tasks.processes import ProcessGroup, alive, start_process, stop_groups, tail
from kiln.tasks.services.auth import apply_auth, uses_kiln_fab
from kiln.tasks.services.environment import (
    USERNAME,
    ServicePaths,
    component_environment,
    ensure_postgres_databases,
    make_private,
    private_umask,
    service_environment,
)
from kiln.tasks.services.watchdog import describe
from kiln.tasks.settings import ServiceSettings, get_service_settings, get_settings
from kiln.tasks.storage.artifacts import write_json

log = logging.getLogger(__name__)

AIRFLOW_HEALTH = ("metadatabase", "scheduler", "triggerer", "dag_processor")
STATE_FILE = "service.json"
#: Where the watchdog records each model server's state, under ``run/``.
SERVERS_FILE = "model-servers.json"


class ServiceError(RuntimeError):
    """A component failed to start or to become healthy; the message carries the log tails."""


@dataclass(frozen=True)
class Component:
    """One long-running process: its name (= its log file's stem), command line, and how it shows it is ready."""

    name: str
    argv: list[str]
    ready_pattern: str | None = None
    """A regular expression the component's log matches once it is ready (Celery workers have no HTTP health
    endpoint)."""
    env: dict[str, str] = field(default_factory=dict)
    """Variables of this component only (a Celery worker's own log-server port)."""
    role: str = "airflow"
    """Which secrets it gets (:func:`kiln.tasks.services.environment.component_environment`)."""


class Service:
    """The platform's services for one ``KILN_HOME``: start, check, stop.

    Args:
        env: the complete environment of the components (see
            :func:`kiln.tasks.services.environment.service_environment`).
        settings: ports, profile and worker count.
        paths: where state, logs and secrets live.
    """

    def __init__(self, env: Mapping[str, str], settings: ServiceSettings, paths: ServicePaths) -> None:
        self.env = dict(env)
        self.settings = settings
        self.paths = paths
        self.url = f"http://{settings.airflow_host}:{settings.airflow_port}"
        self.mlflow_url = f"http://127.0.0.1:{settings.mlflow_port}"
        self._bin = Path(sys.executable).parent
        self._procs: dict[str, ProcessGroup] = {}
        self._log_offsets: dict[str, int] = {}
        #: Where the watchdog records each model server's state.
        self.servers_file = paths.run_dir / SERVERS_FILE
        #: Seconds from the start to each Airflow health check first reporting healthy (:meth:`wait_ready`).
        self.timings: dict[str, float] = {}

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, dags_folder: Path | None = None) -> Service:
        """The service as the environment (``KILN_*``, ``AIRFLOW__*``) configures it."""
        environ = dict(os.environ if environ is None else environ)
        settings = get_service_settings(environ)
        paths = ServicePaths(get_settings(environ).home)
        return cls(service_environment(settings, paths, environ, dags_folder), settings, paths)

    def components(self) -> list[Component]:
        """The processes of this profile, in start order."""
        airflow = str(self._bin / "airflow")
        preloaded = [sys.executable, "-m", "kiln.tasks.services.preload"]
        s = self.settings
        # One machine: the api-server reads task logs from the shared log folder, so the log servers (an extra
        # process of ~100 MB each) only matter when workers run elsewhere (prod).
        local_logs = ["--skip-serve-logs"] if s.profile == "embedded" else []
        kiln = get_settings(self.env)
        comps = [
            Component("api-server", [airflow, "api-server", "--host", s.airflow_host, "--port", str(s.airflow_port)]),
            # Its LocalExecutor workers fork every task process: start them with the steps' libraries loaded.
            Component("scheduler", [*preloaded, "scheduler", *local_logs]),
            Component("dag-processor", [airflow, "dag-processor"]),
            Component("triggerer", [airflow, "triggerer", *local_logs]),
            Component("mlflow", [sys.executable, "-m", "kiln.tasks.services.mlflow_server", "--backend-store-uri",
                                 kiln.mlflow_tracking_uri, "--default-artifact-root", kiln.mlflow_artifact_root,
                                 "--host", "127.0.0.1", "--port", str(s.mlflow_port), "--workers", "1"],
                      # MLflow's job runner (huey consumers for its GenAI jobs) adds eight idle processes and
                      # ~0.5 GB; nothing here submits such jobs.
                      env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, role="mlflow"),
            # Restarts the model servers that die; a component, so that it lives and dies with the set.
            Component("model-servers", [sys.executable, "-m", "kiln.tasks.services.watchdog", "watch", "--owner",
                                        str(self._state_file()), "--status", str(self.servers_file)],
                      ready_pattern=r"watching the model servers", role="model-servers"),
        ]
        if s.profile == "prod":
            log_port = int(self.env.get("AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT") or 8793)
            for i in range(1, s.celery_workers + 1):
                name = f"celery-worker-{i}"
                comps.append(Component(
                    name, [*preloaded, "celery", "worker", "--celery-hostname", f"kiln-w{i}@%h", "--concurrency",
                           str(s.celery_concurrency), "--pid", str(self.paths.run_dir / f"{name}.pid")],
                    # Each worker serves its task logs on a port of its own (the triggerer has log_port + 1).
                    ready_pattern=rf"kiln-w{i}@\S+ ready\.",
                    env={"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(log_port + 1 + i)}))
        return comps

    def up(self, timeout: float = 180.0) -> dict[str, Any]:
        """Start every component that does not run, and the server of every deployed pipeline that has none; wait
        until all are healthy. What runs already is left alone (same pid, never interrupted).

        Returns:
            The state record (url, credentials file, component pids, seconds to ready, model servers).

        Raises:
            ServiceError: a component exited or did not become healthy in ``timeout`` seconds; what this call
                started is stopped again (only that: what ran before keeps running).
        """
        with private_umask():
            make_private(self.paths)
            state = self.state()
            if not state:
                return self._start_all(timeout)
            if dead := self.dead_components(state):
                return self._restart_dead(state, dead, timeout)
            log.info("services already running (%s)", self.url)
            self.apply_auth()  # the roles of teams whose specs were added since
            return self._record(state["pids"], **{k: v for k, v in state.items() if k == "ready_s"},
                                model_servers=self._serve_deployments())

    def _start_all(self, timeout: float) -> dict[str, Any]:
        started = time.monotonic()
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            ensure_postgres_databases(self.env)
            self.migrate()
            self.apply_auth()
            self.start()
            self._record(self.pids)
            self.wait_ready(timeout, started=started)
            servers = self._serve_deployments()
        except BaseException:
            self.down()
            raise
        state = self._record(self.pids, ready_s=round(time.monotonic() - started, 1), model_servers=servers)
        log.info("services ready after %.1f s: %s", state["ready_s"], self.url)
        return state

    def _restart_dead(self, state: Mapping[str, Any], dead: list[str], timeout: float) -> dict[str, Any]:
        """Start the ``dead`` components again; the others keep running, untouched."""
        started = time.monotonic()
        log.warning("services of %s partly running: starting %s again", self.paths.home, ", ".join(dead))
        old = dict(state.get("pids") or {})
        # What a dead leader left in its group (a worker still holding its port) goes with it.
        stop_groups({old[n] for n in dead if n in old}, grace_s=5.0, what="processes of dead components")
        try:
            self.apply_auth()
            self.start(dead)
            self._record({**old, **self.pids})
            self.wait_ready(timeout, started=started)
            servers = self._serve_deployments()
        except BaseException:
            stop_groups(set(self.pids.values()), grace_s=30.0, children=self._procs.values())
            self._procs.clear()
            raise
        state = self._record({**old, **self.pids}, ready_s=round(time.monotonic() - started, 1),
                             model_servers=servers)
        log.info("%s ready again after %.1f s", ", ".join(dead), state["ready_s"])
        return state

    def dead_components(self, state: Mapping[str, Any]) -> list[str]:
        """The components of this profile that the state record names no live process for."""
        pids = state.get("pids") or {}
        return [c.name for c in self.components() if not (c.name in pids and alive(pids[c.name]))]

    def log_file(self, name: str) -> Path:
        """The log file of a component (or of ``migrate``)."""
        return self.paths.log_dir / f"{name}.log"

    def migrate(self) -> None:
        """Create or upgrade the Airflow metadata DB (``airflow db migrate``), its output in ``migrate.log``.

        Raises:
            ServiceError: the migration failed; the message holds its log's tail.
        """
        logfile = self.log_file("migrate")
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with logfile.open("wb") as out:
            result = subprocess.run([str(self._bin / "airflow"), "db", "migrate"], cwd=self.paths.home,
                                    env=component_environment(self.env, "airflow", self.paths), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=600)
        if result.returncode != 0:
            raise ServiceError(f"airflow db migrate exited {result.returncode}:\n{tail(logfile)}")

    def apply_auth(self) -> None:
        """Create the roles and users of the specs' teams when Airflow runs kiln's FAB auth manager (the prod
        profile's): before the DAG processor starts, which refuses a DAG whose team role is missing.

        Raises:
            ServiceError: the roles or users could not be created; the message holds the command's output.
        """
        if not uses_kiln_fab(self.env):
            return
        try:
            apply_auth(component_environment(self.env, "airflow", self.paths), self.paths,
                       get_settings(self.env).pipelines_dir)
        except RuntimeError as exc:
            raise ServiceError(str(exc)) from exc

    def start(self, names: Collection[str] | None = None) -> None:
        """Start the named components (default: all of :meth:`components`), each in a session of its own with
        :attr:`env` less the secrets its role must not hold (plus the component's own variables), its output
        appended to :meth:`log_file`."""
        self.paths.log_dir.mkdir(parents=True, exist_ok=True)
        for comp in self.components():
            if names is None or comp.name in names:
                logfile = self.log_file(comp.name)
                self._log_offsets[comp.name] = logfile.stat().st_size if logfile.exists() else 0
                env = {**component_environment(self.env, comp.role, self.paths), **comp.env}
                self._procs[comp.name] = start_process(comp.argv, cwd=self.paths.home, env=env, output=logfile)
                log.info("started %s (pid %d)", comp.name, self._procs[comp.name].pid)

    @property
    def pids(self) -> dict[str, int]:
        """The leader pid (= process group id) of each component this instance started, by name."""
        return {name: proc.pid for name, proc in self._procs.items()}

    def wait_ready(self, timeout: float, started: float | None = None) -> None:
        """Wait until every started component is healthy, recording when each Airflow check was in :attr:`timings`.

        Args:
            timeout: seconds from ``started`` (a ``time.monotonic()`` value; default: now).

        Raises:
            ServiceError: a component exited, or not all were healthy in time; the message holds the log tails.
        """
        started = time.monotonic() if started is None else started
        comps = {c.name: c for c in self.components() if c.name in self._procs}
        pending = set(comps)
        warmed = False
        with httpx.Client(timeout=5.0) as http:
            while pending:
                exited = {n: code for n, p in self._procs.items() if (code := p.poll()) is not None}
                if exited:
                    raise ServiceError(f"components exited during start-up {exited}\n{self.log_tails(exited)}")
                health = _get_json(http, f"{self.url}/api/v2/monitor/health")
                for key in AIRFLOW_HEALTH:
                    if (health.get(key) or {}).get("status") == "healthy":
                        self.timings.setdefault(key, time.monotonic() - started)
                if all((health.get(k) or {}).get("status") == "healthy" for k in AIRFLOW_HEALTH):
                    if not warmed:
                        # The execution API builds its app on its first request (seconds of CPU, blocking the
                        # api-server's loop): paid here, not by the first task, whose call would time out.
                        http.get(f"{self.url}/execution/health", timeout=60.0)
                        warmed = True
                    pending -= {"api-server", "scheduler", "dag-processor", "triggerer"}
                if "mlflow" in pending and _get_status(http, f"{self.mlflow_url}/health") == 200:
                    pending.discard("mlflow")
                for name in [n for n in pending if comps[n].ready_pattern]:
                    since = self._log_offsets.get(name, 0)  # the lines of this start, not an earlier one
                    if re.search(comps[name].ready_pattern or "", tail(self.log_file(name), 200, offset=since)):
                        pending.discard(name)
                if pending and time.monotonic() - started > timeout:
                    raise ServiceError(f"not healthy after {timeout:.0f} s: {sorted(pending)}; health {health}\n"
                                       f"{self.log_tails(pending)}")
                if pending:
                    time.sleep(0.5)

    def _serve_deployments(self) -> dict[str, str]:
        """Bring the local deployment files up to the store's records (deploys on other hosts), then start each
        deployed pipeline's server that does not run (not those that do); return pipeline -> URL."""
        from kiln.tasks.pipeline.served import materialise_in_subprocess

        materialise_in_subprocess(component_environment(self.env, "mlflow", self.paths))
        proc = subprocess.run([sys.executable, "-m", "kiln.tasks.services.watchdog", "start", "--json"],
                              env=component_environment(self.env, "model-servers", self.paths), capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0:
            raise ServiceError(f"starting the model servers failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout)

    def _state_file(self) -> Path:
        return self.paths.run_dir / STATE_FILE

    def _record(self, pids: Mapping[str, int], **extra: Any) -> dict[str, Any]:
        """Write the state record naming the components ``pids`` (atomically) and return it."""
        state = {"profile": self.settings.profile, "url": self.url, "mlflow_url": self.mlflow_url,
                 "credentials": str(self.paths.passwords_file), "username": USERNAME,
                 "logs": str(self.paths.log_dir), "pids": dict(pids), **extra}
        write_json(self._state_file(), state)
        return state

    def state(self) -> dict[str, Any] | None:
        """The state record of the services started from this ``KILN_HOME`` (None when none were)."""
        path = self._state_file()
        return json.loads(path.read_text()) if path.exists() else None

    def status(self) -> dict[str, Any]:
        """The state record, whether every component runs, each one's state and pid, and each model server's."""
        state = self.state() or {}
        pids = state.get("pids") or {}
        components = {c.name: {"state": ("running" if alive(pids[c.name]) else "dead") if c.name in pids
                               else "stopped", "pid": pids.get(c.name)} for c in self.components()}
        watching = components["model-servers"]["state"] == "running"
        servers = describe(get_settings(self.env).serving_dir, self.servers_file, watching)
        running = bool(state) and all(c["state"] == "running" for c in components.values())
        return {**state, "running": running, "components": components, "model_servers": servers}

    def log_tails(self, names: Any = None, lines: int = 30) -> str:
        """The last lines of the named components' logs (default: all), each under a header."""
        names = sorted(names) if names is not None else [c.name for c in self.components()]
        return "\n".join(f"--- {n}.log ---\n{tail(self.log_file(n), lines)}" for n in names)

    def stop(self, timeout: float = 30.0, also: Iterable[int] = ()) -> list[int]:
        """Stop the components this instance started and those of the state record, with every process they
        started (:func:`kiln.tasks.processes.stop_groups`); idempotent.

        Args:
            timeout: grace period between SIGTERM and SIGKILL.
            also: more pids to stop (descendants seen earlier that may have left the process tree since).

        Returns:
            The pids that had to be killed.
        """
        groups = set((self.state() or {}).get("pids", {}).values()) | set(self.pids.values())
        killed = stop_groups(groups, grace_s=timeout, children=self._procs.values(), also=also)
        self._procs.clear()
        return killed

    def down(self, timeout: float = 30.0) -> list[int]:
        """Stop every component (:meth:`stop`) and the model servers; idempotent.

        Returns:
            The pids that had to be killed.
        """
        killed = self.stop(timeout)  # the watchdog first: it must not restart the servers stopped next
        subprocess.run([sys.executable, "-m", "kiln.tasks.cli", "serve", "stop"], capture_output=True, timeout=120,
                       env=component_environment(self.env, "model-servers", self.paths))
        self._state_file().unlink(missing_ok=True)
        return killed


def _get_json(http: httpx.Client, url: str) -> dict[str, Any]:
    try:
        return http.get(url).json()
    except (httpx.HTTPError, ValueError):
        return {}


def _get_status(http: httpx.Client, url: str) -> int:
    try:
        return http.get(url).status_code
    except httpx.HTTPError:
        return 0


if __name__ == "__main__":  # the same as kiln up|down|status
    from kiln.tasks.cli.services import main

    sys.exit(main())
