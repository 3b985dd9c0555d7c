"""Real Airflow 3 services for integration tests: api-server, scheduler, dag-processor and triggerer.

``AirflowService`` starts the components through the platform's own supervisor
(:class:`kiln.tasks.services.supervisor.Service`: the command lines of ``make up``, each process in its own
session, so its own process group, its log in ``<home>/logs/service/``), with a private ``AIRFLOW_HOME``, a given
dags folder and metadata DB, LocalExecutor and SimpleAuthManager, and talks to them through the REST API with a
JWT. The subprocess environment is built from scratch for Airflow: every ``AIRFLOW*`` variable of the calling
process (e.g. the one pytest's conftest sets) is dropped, so the services never see the test process's Airflow
config. ``extra_env`` is applied last and may override any default.

    with AirflowService(dags_folder, extra_env={"KILN_HOME": str(tmp)}) as svc:
        svc.wait_for_dag("smoke_service")
        run_id = svc.trigger("smoke_service")
        assert svc.wait_for_run("smoke_service", run_id) == "success"
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from cryptography.fernet import Fernet

from kiln.tasks.processes import alive, process_tree, tail
from kiln.tasks.services.environment import ServicePaths
from kiln.tasks.services.supervisor import Service, ServiceError
from kiln.tasks.settings import get_service_settings

log = logging.getLogger(__name__)

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
FINAL_RUN_STATES = frozenset({"success", "failed"})
USERNAME = "admin"


class AirflowServiceError(RuntimeError):
    """A harness step failed; the message carries the API response or the components' log tails."""


class DagImportError(AirflowServiceError):
    """The awaited DAG's file failed to import; ``import_errors`` holds the API's import-error records."""

    def __init__(self, message: str, import_errors: list[dict]) -> None:
        super().__init__(message)
        self.import_errors = import_errors


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class AirflowService:
    """Airflow components as separate processes, with REST helpers; a context manager that always stops them.

    Args:
        dags_folder: folder the dag-processor parses.
        db_url: SQLAlchemy URL of the metadata DB; default a SQLite file in the home. It is migrated on start.
        parallelism: ``[core] parallelism`` (LocalExecutor worker processes).
        extra_env: variables added to every component's environment last (may override the defaults).
        home: ``AIRFLOW_HOME``; default a temporary folder removed by ``stop()``.
        start_timeout: seconds to wait for all four components to report healthy.
    """

    def __init__(self, dags_folder: str | Path, *, db_url: str | None = None, parallelism: int = 4,
                 extra_env: dict[str, str] | None = None, home: str | Path | None = None,
                 start_timeout: float = 120.0) -> None:
        self.dags_folder = Path(dags_folder).resolve()
        self._own_home = home is None
        self.home = Path(home) if home is not None else Path(tempfile.mkdtemp(prefix="kiln-airflow-"))
        self.db_url = db_url or f"sqlite:///{self.home / 'airflow.db'}"
        self.parallelism = parallelism
        self.extra_env = dict(extra_env or {})
        self.start_timeout = start_timeout
        # Fixed default log-server ports (8793/8794) would clash with a second harness or a developer's Airflow.
        self.port, self._worker_log_port, self._trigger_log_port = free_ports(3)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.password = secrets.token_urlsafe(16)
        self.startup_seconds: float | None = None
        #: seconds from ``start()`` to: DB migrated, each component healthy, ready (token in hand)
        self.timings: dict[str, float] = {}
        self._client = httpx.Client(base_url=self.base_url, timeout=30.0)
        self._stopped = False
        self._known: set[int] = set()
        # Secrets must be identical for every component: the api-server signs the JWTs that workers present.
        self._fernet_key = Fernet.generate_key().decode()
        self._jwt_secret = secrets.token_urlsafe(64)
        self._api_secret = secrets.token_urlsafe(32)
        settings = get_service_settings({"KILN_AIRFLOW_HOST": "127.0.0.1", "KILN_AIRFLOW_PORT": str(self.port)})
        self._service = Service(self.environment(), settings, ServicePaths(self.home))

    def __enter__(self) -> AirflowService:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def environment(self) -> dict[str, str]:
        """Return the complete environment every component (and ``airflow db migrate``) runs with."""
        bin_dir = str(Path(sys.executable).parent)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update(
            PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1", GX_ANALYTICS_ENABLED="false",
            AIRFLOW_HOME=str(self.home),
            AIRFLOW__CORE__DAGS_FOLDER=str(self.dags_folder),
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=self.db_url,
            AIRFLOW__CORE__EXECUTOR="LocalExecutor",
            AIRFLOW__CORE__PARALLELISM=str(self.parallelism),
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW__CORE__UNIT_TEST_MODE="False",
            AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
            AIRFLOW__CORE__FERNET_KEY=self._fernet_key,
            AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"{self.base_url}/execution/",
            AIRFLOW__CORE__AUTH_MANAGER="airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=f"{USERNAME}:admin",
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(self.home / "passwords.json"),
            AIRFLOW__API_AUTH__JWT_SECRET=self._jwt_secret,
            AIRFLOW__API__SECRET_KEY=self._api_secret,
            AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(self._worker_log_port),
            AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(self._trigger_log_port),
            AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="3",
            AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL="15",
            AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES="1",
            AIRFLOW__SCHEDULER__PARSING_CLEANUP_INTERVAL="10",
            AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC="2",
        )
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        """Migrate the DB, start the components, wait until all are healthy and get a JWT.

        Raises:
            AirflowServiceError: migration failed, a component exited, or health timed out (with log tails).
        """
        atexit.register(self.stop)
        started = time.monotonic()
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            (self.home / "passwords.json").write_text(json.dumps({USERNAME: self.password}))
            try:
                self._service.migrate()
                self.timings["migrate"] = time.monotonic() - started
                self._service.start(COMPONENTS)
                # start_timeout counts from the end of the migration.
                self._service.wait_ready(self.timings["migrate"] + self.start_timeout, started=started)
            except ServiceError as exc:
                raise AirflowServiceError(str(exc)) from exc
            self.timings.update(self._service.timings)
            token = self._client.post("/auth/token", json={"username": USERNAME, "password": self.password})
            self._check(token, "POST /auth/token")
            self._client.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
        except BaseException:
            self.stop()
            raise
        self.timings["ready"] = self.startup_seconds = time.monotonic() - started
        log.info("Airflow services ready on %s after %.1f s (db %s; %s)", self.base_url, self.startup_seconds,
                 self.db_url.split("://")[0], ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items()))

    def log_file(self, name: str) -> Path:
        """The log file of a component (``scheduler``, ...) or of ``migrate``."""
        return self._service.log_file(name)

    def log_tails(self, lines: int = 30) -> str:
        """Return the last lines of every component's log, each under a header."""
        return self._service.log_tails(COMPONENTS, lines)

    @property
    def component_pids(self) -> dict[str, int]:
        """Return each component's leader pid (= its process group id), by component name."""
        return self._service.pids

    def process_ids(self) -> list[int]:
        """Return the live (non-zombie) processes of the components' process groups and their descendants.

        Every pid once returned is remembered, so a descendant that left its group (setsid) is still tracked.
        """
        groups = set(self.component_pids.values())
        self._known.update(process_tree(groups))
        return sorted(pid for pid in self._known | groups if alive(pid))

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every component (:meth:`kiln.tasks.services.supervisor.Service.stop`), including descendants seen
        by :meth:`process_ids`; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        started = time.monotonic()
        self._service.stop(timeout, also=self.process_ids())
        self._client.close()
        log.info("Airflow services stopped in %.1f s", time.monotonic() - started)
        if self._own_home:
            shutil.rmtree(self.home, ignore_errors=True)

    # REST helpers ----------------------------------------------------------------------------------------------

    @staticmethod
    def _check(response: httpx.Response, what: str) -> httpx.Response:
        if response.status_code >= 400:
            raise AirflowServiceError(f"{what} -> HTTP {response.status_code}: {response.text[:2000]}")
        return response

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send an authenticated request (``path`` starts with ``/``); raise on HTTP >= 400."""
        return self._check(self._client.request(method, path, **kwargs), f"{method} {path}")

    def get(self, path: str, params: dict | None = None) -> Any:
        """GET ``path`` and return the decoded JSON body."""
        return self.request("GET", path, params=params).json()

    def post(self, path: str, json: Any = None) -> Any:
        """POST a JSON body to ``path`` and return the decoded JSON body."""
        return self.request("POST", path, json=json).json()

    def patch(self, path: str, json: Any = None, params: dict | None = None) -> Any:
        """PATCH ``path`` with a JSON body and return the decoded JSON body."""
        return self.request("PATCH", path, json=json, params=params).json()

    def import_errors(self) -> list[dict]:
        """Return the current import errors (filename, stack_trace, timestamp, ...)."""
        return self.get("/api/v2/importErrors", params={"limit": 100})["import_errors"]

    def wait_for_dag(self, dag_id: str, timeout: float = 60.0) -> dict:
        """Wait until the DAG is served by the API without an import error and return its record.

        An import error counts as the DAG's own when the DAG is flagged ``has_import_errors`` or the error's
        file is named after the DAG id or its trace mentions it; errors of other files are only reported on
        timeout.

        Raises:
            DagImportError: the DAG's file failed to import.
            AirflowServiceError: the DAG did not appear within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            response = self._client.get(f"/api/v2/dags/{quote(dag_id, safe='')}")
            dag = self._check(response, f"GET dag {dag_id}").json() if response.status_code != 404 else None
            errors = self.import_errors()
            own = [e for e in errors if Path(e["filename"]).stem == dag_id or dag_id in e.get("stack_trace", "")]
            if own or (dag and dag.get("has_import_errors")):
                text = "\n".join(f"{e['filename']}:\n{e['stack_trace']}" for e in own or errors)
                raise DagImportError(f"DAG {dag_id!r} has import errors:\n{text}", own or errors)
            if dag is not None:
                return dag
            if time.monotonic() > deadline:
                text = "\n".join(f"{e['filename']}: {e['stack_trace'][-500:]}" for e in errors) or "none"
                raise AirflowServiceError(f"DAG {dag_id!r} not served after {timeout:.0f} s; import errors: {text}\n"
                                          f"{tail(self.log_file('dag-processor'))}")
            time.sleep(0.5)

    def unpause(self, dag_id: str) -> None:
        """Unpause the DAG (new DAGs start unpaused here; this is for DAGs a test paused)."""
        self.patch(f"/api/v2/dags/{quote(dag_id, safe='')}", json={"is_paused": False})

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        """Trigger a manual run without a logical date and return its run id."""
        body = {"logical_date": None, "conf": conf or {}}
        return self.post(f"/api/v2/dags/{quote(dag_id, safe='')}/dagRuns", json=body)["dag_run_id"]

    def _run_path(self, dag_id: str, run_id: str) -> str:
        return f"/api/v2/dags/{quote(dag_id, safe='')}/dagRuns/{quote(run_id, safe='')}"

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 120.0,
                     on_poll: Callable[[list[dict]], None] | None = None, interval: float = 0.5) -> str:
        """Poll the run until it is ``success`` or ``failed`` and return that state.

        Args:
            on_poll: called with ``task_instances(dag_id, run_id)`` on every poll (to record states seen).

        Raises:
            AirflowServiceError: still not finished after ``timeout`` seconds (with task states and log tails).
        """
        deadline = time.monotonic() + timeout
        while True:
            state = self.get(self._run_path(dag_id, run_id))["state"]
            if on_poll is not None:
                on_poll(self.task_instances(dag_id, run_id))
            if state in FINAL_RUN_STATES:
                return state
            if time.monotonic() > deadline:
                tis = {ti["task_id"]: ti["state"] for ti in self.task_instances(dag_id, run_id)}
                raise AirflowServiceError(f"run {run_id} of {dag_id} still {state} after {timeout:.0f} s; "
                                          f"tasks {tis}\n{self.log_tails()}")
            time.sleep(interval)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        """Return the run's task instances as the API gives them (state, start/end_date, try_number, pid, ...)."""
        return self.get(f"{self._run_path(dag_id, run_id)}/taskInstances", params={"limit": 100})["task_instances"]

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        """Return a task try's full log as text, one line per structured log record."""
        path = f"{self._run_path(dag_id, run_id)}/taskInstances/{quote(task_id, safe='')}/logs/{try_number}"
        body = self.get(path, params={"full_content": "true"})
        lines = []
        for record in body.get("content", []):
            if isinstance(record, dict):
                head = " ".join(str(record[k]) for k in ("timestamp", "level", "logger") if record.get(k))
                lines.append(f"{head} {record.get('event', '')}".strip())
            else:
                lines.append(str(record))
        return "\n".join(lines)


@contextmanager
def temporary_postgres_database(host: str = "127.0.0.1", port: int = 5432, user: str = "postgres",
                                prefix: str = "kiln_af_") -> Iterator[str]:
    """Create a fresh PostgreSQL database, yield its SQLAlchemy URL (psycopg2 driver), drop it afterwards.

    The server must accept ``user`` without a password (trust auth on loopback); the database is dropped
    ``WITH (FORCE)`` so connections a killed component left behind do not block the drop.
    """
    import psycopg2

    name = f"{prefix}{secrets.token_hex(6)}"
    admin = psycopg2.connect(host=host, port=port, user=user, dbname="postgres")
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql+psycopg2://{user}@{host}:{port}/{name}"
        finally:
            with admin.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()
