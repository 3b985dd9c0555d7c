"""The platform's own services (``kiln.tasks.services.supervisor``, what ``make up`` runs) inside a test or benchmark.

``running_service`` starts them on free ports with a private ``KILN_HOME`` and pipelines folder, on the
embedded profile or on the prod profile (fresh PostgreSQL databases, a Celery queue of its own on the local Redis,
Celery workers), and yields a :class:`Platform`: the REST client (the official ``apache-airflow-client``) with a token,
plus the paths. Everything is stopped, and the databases dropped, on exit.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import airflow_client.client as ac
from airflow_client.client.api.dag_run_api import DagRunApi
from airflow_client.client.models.trigger_dag_run_post_body import TriggerDAGRunPostBody
from airflow_service import free_ports, temporary_postgres_database

from kiln.tasks.services.supervisor import Service

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_SPECS = REPO / "dags" / "pipelines"
FINAL = ("success", "failed")


@dataclass
class Platform:
    """A running platform: its service, REST base URL, credentials and a configured API client."""

    service: Service
    url: str
    username: str
    password: str
    home: Path
    pipelines_dir: Path
    api: ac.ApiClient

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        """Trigger a run through the REST API (``logical_date`` null) and return its run id."""
        run = DagRunApi(self.api).trigger_dag_run(dag_id, TriggerDAGRunPostBody(conf=conf or {}))
        return run.dag_run_id

    def wait(self, dag_id: str, run_id: str, timeout: float = 600.0) -> str:
        """Poll the run until it is ``success`` or ``failed``; return that state."""
        runs = DagRunApi(self.api)
        deadline = time.monotonic() + timeout
        while (state := runs.get_dag_run(dag_id, run_id).state.value) not in FINAL:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{dag_id} run {run_id} still {state} after {timeout:.0f} s\n"
                                   f"{self.service.log_tails()}")
            time.sleep(0.5)
        return state


def get_token(url: str, username: str, password: str) -> str:
    """POST /auth/token and return the access token."""
    req = urllib.request.Request(f"{url}/auth/token", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"username": username, "password": password}).encode())
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)["access_token"]


@contextmanager
def running_service(tmp: Path, *, profile: str = "embedded", specs: list[Path] | None = None,
                    extra_env: dict[str, str] | None = None, timeout: float = 240.0) -> Iterator[Platform]:
    """Start the platform's services for a test; stop them (and drop prod's databases) on exit.

    Args:
        tmp: a private folder: ``KILN_HOME`` and the pipelines folder go under it.
        profile: ``embedded`` or ``prod``.
        specs: spec files copied into the pipelines folder (default: the example pipelines).
        extra_env: variables set last (override anything).
    """
    home, pipelines = tmp / "home", tmp / "pipelines"
    pipelines.mkdir(parents=True, exist_ok=True)
    for spec in specs if specs is not None else sorted(EXAMPLE_SPECS.glob("*.yaml")):
        shutil.copy(spec, pipelines / spec.name)
    airflow_port, mlflow_port, serve_port, log_port, trigger_port = free_ports(5)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "KILN_"))}
    environ.update(KILN_HOME=str(home), KILN_PIPELINES_DIR=str(pipelines), KILN_PROFILE=profile,
                   KILN_AIRFLOW_PORT=str(airflow_port), KILN_MLFLOW_PORT=str(mlflow_port),
                   KILN_SERVE_PORT=str(serve_port), AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(log_port),
                   AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(trigger_port),
                   # A 500 from the REST API then carries the failing statement, the database's own error and the
                   # traceback, so a test that gets one fails with the cause instead of a lookup id in a log that
                   # is deleted with the test's folder.
                   AIRFLOW__API__EXPOSE_STACKTRACE="True")
    with ExitStack() as stack:
        if profile == "prod":
            for var in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "KILN_MLFLOW_TRACKING_URI", "KILN_POOLS_DB_URL"):
                environ[var] = stack.enter_context(temporary_postgres_database())
            environ["AIRFLOW__CELERY__RESULT_BACKEND"] = "db+" + environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
            # A Celery queue of its own on the machine's Redis: workers of other services never take its tasks,
            # and nothing in Redis is emptied.
            environ["AIRFLOW__OPERATORS__DEFAULT_QUEUE"] = f"kiln-test-{secrets.token_hex(4)}"
        environ.update(extra_env or {})
        service = Service.from_environment(environ)
        stack.callback(service.down)
        state = service.up(timeout=timeout)
        password = json.loads(Path(state["credentials"]).read_text())[state["username"]]
        cfg = ac.Configuration(host=state["url"], access_token=get_token(state["url"], state["username"], password))
        api = stack.enter_context(ac.ApiClient(cfg))
        yield Platform(service, state["url"], state["username"], password, home, pipelines, api)
