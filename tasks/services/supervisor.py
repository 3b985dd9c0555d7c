"""Run the platform as services: ``python -m kiln.tasks.services.supervisor up|down|status`` (``make up`` / ``make down``).

``up`` migrates the Airflow metadata DB, starts the api-server (UI + REST), scheduler, dag-processor, triggerer,
an MLflow server (where the UI's extra links point), the Celery workers of the ``prod`` profile, and the model
servers of pipelines that have a deployment; waits until every one is healthy; and prints the URL and where the
generated credentials are. The components outlive the command: each runs in its own session (so its own process
group) with its log under ``$KILN_HOME/logs/service/``, and ``$KILN_HOME/run/service.json`` records them for
``down``, which stops every process group and the processes that left one, with no orphans.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from kiln.tasks.services.environment import (
    USERNAME,
    ServicePaths,
    ensure_postgres_databases,
    service_environment,
)
from kiln.tasks.settings import ServiceSettings, get_service_settings, get_settings

log = logging.getLogger(__name__)

AIRFLOW_HEALTH = ("metadatabase", "scheduler", "triggerer", "dag_processor")
STATE_FILE = "service.json"


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


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a text file ('' if it does not exist)."""
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Service:
    """The platform's services for one ``KILN_HOME``: start, check, stop.

    Args:
        env: the complete environment of the components (see :func:`kiln.tasks.services.environment.service_environment`).
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
        self._procs: dict[str, subprocess.Popen] = {}

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, dags_folder: Path | None = None) -> Service:
        """The service as the environment (``KILN_*``, ``AIRFLOW__*``) configures it."""
        environ = dict(os.environ if environ is None else environ)
        settings = get_service_settings(environ)
        paths = ServicePaths(get_settings(environ).home)
        return cls(service_environment(settings, paths, environ, dags_folder), settings, paths)

    # Components ------------------------------------------------------------------------------------------------

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
                      env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}),
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

    # Start -----------------------------------------------------------------------------------------------------

    def up(self, timeout: float = 180.0) -> dict[str, Any]:
        """Start every component unless the services already run; wait until all are healthy.

        Returns:
            The state record (url, credentials file, component pids, seconds to ready).

        Raises:
            ServiceError: a component exited or did not become healthy in ``timeout`` seconds; everything
                started is stopped again.
        """
        if (state := self.state()) and self.running(state):
            log.info("services already running (%s)", self.url)
            return {**state, "model_servers": self._serve_deployments()}
        if state:  # some components died: stop the rest before starting anew, or their ports stay taken
            log.warning("services of %s were partly running; stopping them first", self.paths.home)
            self.down()
        started = time.monotonic()
        for folder in (self.paths.run_dir, self.paths.log_dir):
            folder.mkdir(parents=True, exist_ok=True)
        try:
            ensure_postgres_databases(self.env)
            self._migrate()
            for comp in self.components():
                self._launch(comp)
                self._write_state(started)
            self._wait_ready(started, timeout)
            servers = self._serve_deployments()
        except BaseException:
            self.down()
            raise
        state = self._write_state(started, ready_s=round(time.monotonic() - started, 1), model_servers=servers)
        log.info("services ready after %.1f s: %s", state["ready_s"], self.url)
        return state

    def _migrate(self) -> None:
        logfile = self.paths.log_dir / "migrate.log"
        with logfile.open("wb") as out:
            result = subprocess.run([str(self._bin / "airflow"), "db", "migrate"], env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=600)
        if result.returncode != 0:
            raise ServiceError(f"airflow db migrate exited {result.returncode}:\n{tail(logfile)}")

    def _launch(self, comp: Component) -> None:
        with (self.paths.log_dir / f"{comp.name}.log").open("ab") as logfile:
            self._procs[comp.name] = subprocess.Popen(
                comp.argv, env={**self.env, **comp.env}, cwd=self.paths.home, stdin=subprocess.DEVNULL,
                stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
        log.info("started %s (pid %d)", comp.name, self._procs[comp.name].pid)

    def _wait_ready(self, started: float, timeout: float) -> None:
        comps = {c.name: c for c in self.components()}
        pending = set(comps)
        warmed = False
        with httpx.Client(timeout=5.0) as http:
            while pending:
                exited = {n: p.returncode for n, p in self._procs.items() if p.poll() is not None}
                if exited:
                    raise ServiceError(f"components exited during start-up {exited}\n{self.log_tails(exited)}")
                health = _get_json(http, f"{self.url}/api/v2/monitor/health")
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
                    if re.search(comps[name].ready_pattern or "", tail(self.paths.log_dir / f"{name}.log", 200)):
                        pending.discard(name)
                if pending and time.monotonic() - started > timeout:
                    raise ServiceError(f"not healthy after {timeout:.0f} s: {sorted(pending)}; health {health}\n"
                                       f"{self.log_tails(pending)}")
                if pending:
                    time.sleep(0.5)

    def _serve_deployments(self) -> dict[str, str]:
        """Start the model server of every pipeline that has a deployment; return model -> URL."""
        proc = subprocess.run([sys.executable, "-m", "kiln.tasks.cli.models", "serve", "--json"], env=self.env,
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise ServiceError(f"starting the model servers failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout)

    # State -----------------------------------------------------------------------------------------------------

    def _state_file(self) -> Path:
        return self.paths.run_dir / STATE_FILE

    def _write_state(self, started: float, **extra: Any) -> dict[str, Any]:
        state = {"profile": self.settings.profile, "url": self.url, "mlflow_url": self.mlflow_url,
                 "credentials": str(self.paths.passwords_file), "username": USERNAME,
                 "logs": str(self.paths.log_dir), "pids": {n: p.pid for n, p in self._procs.items()}, **extra}
        tmp = self._state_file().with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self._state_file())
        return state

    def state(self) -> dict[str, Any] | None:
        """The state record of the services started from this ``KILN_HOME`` (None when none were)."""
        path = self._state_file()
        return json.loads(path.read_text()) if path.exists() else None

    @staticmethod
    def running(state: Mapping[str, Any]) -> bool:
        """Whether every component of a state record is alive."""
        return bool(state.get("pids")) and all(alive(pid) for pid in state["pids"].values())

    def log_tails(self, names: Any = None, lines: int = 30) -> str:
        """The last lines of the named components' logs (default: all), each under a header."""
        names = sorted(names) if names is not None else [c.name for c in self.components()]
        return "\n".join(f"--- {n}.log ---\n{tail(self.paths.log_dir / f'{n}.log', lines)}" for n in names)

    # Stop ------------------------------------------------------------------------------------------------------

    def down(self, timeout: float = 30.0) -> list[int]:
        """Stop every component (:func:`stop_process_groups`) and the model servers; idempotent.

        Returns:
            The pids that had to be killed.
        """
        state = self.state() or {}
        groups = set(state.get("pids", {}).values()) | {p.pid for p in self._procs.values()}
        killed = stop_process_groups(groups, list(self._procs.values()), timeout)
        self._procs.clear()
        subprocess.run([sys.executable, "-m", "kiln.tasks.cli.models", "stop"], env=self.env,
                       capture_output=True, timeout=120)
        self._state_file().unlink(missing_ok=True)
        return killed


def process_tree(groups: set[int]) -> set[int]:
    """Live processes of the given process groups (ids = their leaders' pids) and all their descendants, also
    those that started a session of their own."""
    found: set[int] = set()
    for leader in groups:
        with suppress(psutil.NoSuchProcess):
            found.update(c.pid for c in psutil.Process(leader).children(recursive=True))
    for proc in psutil.process_iter():
        with suppress(ProcessLookupError, psutil.NoSuchProcess):
            if os.getpgid(proc.pid) in groups:
                found.add(proc.pid)
    return {pid for pid in found | groups if alive(pid)}


def stop_process_groups(groups: set[int], children: list[subprocess.Popen], timeout: float,
                        also: set[int] | None = None) -> list[int]:
    """SIGTERM whole process groups, wait up to ``timeout`` s for them and every descendant, SIGKILL the rest.

    A TERM to a single Airflow process can orphan its children, so whole groups are signalled; descendants that
    left their group (a session of their own) are found from the process tree first and signalled one by one.

    Args:
        groups: process group ids (= their leaders' pids).
        children: the leaders this process started itself, reaped while waiting (or they stay zombies).
        also: more pids to stop (descendants seen earlier that may have left the tree since).

    Returns:
        The pids that had to be killed.
    """
    members = process_tree(groups) | {pid for pid in also or () if alive(pid)}
    for pgid in groups:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    for pid in members:
        with suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) not in groups:
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while (left := {pid for pid in members if alive(pid)}) and time.monotonic() < deadline:
        for proc in children:
            proc.poll()
        time.sleep(0.2)
    if left:
        log.warning("still alive %.0f s after SIGTERM, killing: %s", timeout, _describe(left))
        for pid in left:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for proc in children:
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    return sorted(left)


def _describe(pids: set[int]) -> str:
    """``pid (command line)`` of each process, for the log."""
    out = []
    for pid in sorted(pids):
        with suppress(psutil.NoSuchProcess):
            out.append(f"{pid} ({' '.join(psutil.Process(pid).cmdline())[:80]})")
    return ", ".join(out)


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


def main(argv: list[str] | None = None) -> int:
    """CLI: ``up`` (start and wait), ``down`` (stop everything), ``status`` (print the state record)."""
    parser = argparse.ArgumentParser(prog="python -m kiln.tasks.services.supervisor", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for health (up)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        service = Service.from_environment()
    except ValueError as exc:
        parser.error(str(exc))
    if args.action == "down":
        killed = service.down()
        print("services stopped" + (f" (killed after the grace period: {killed})" if killed else ""))
        return 0
    if args.action == "status":
        state = service.state()
        running = bool(state) and service.running(state)  # type: ignore[arg-type]
        print(json.dumps({**(state or {}), "running": running}, indent=2))
        return 0 if running else 3
    try:
        state = service.up(timeout=args.timeout)
    except (ServiceError, RuntimeError) as exc:
        print(f"make up failed: {exc}", file=sys.stderr)
        return 1
    print(f"""
kiln is up ({state['profile']} profile)
  Airflow UI and REST API: {state['url']}   user {state['username']}, password in {state['credentials']}
  MLflow:                  {state['mlflow_url']}
  model servers:           {', '.join(f'{m} {u}' for m, u in (state.get('model_servers') or {}).items()) or 'none yet'}
  logs:                    {state['logs']}
  stop with:               make down""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
