"""Each component's secrets, private state and the model servers' restart budget (issue 20, part 6), without services.

The running services are tested in ``tests/integration/test_service_supervision.py``; here: which variables each
kind of component gets, that Airflow reads its secrets from the private config file that replaces them, that older
state is made private, and how often a dead model server is restarted.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.tasks.services.environment import (
    AIRFLOW_SECRETS,
    ServicePaths,
    component_environment,
    make_private,
    private_umask,
    service_environment,
)
from kiln.tasks.services.watchdog import RestartPolicy
from kiln.tasks.settings import get_service_settings

PROD = {"KILN_PROFILE": "prod", "KILN_POSTGRES_URL": "postgresql://ml:pw@db.internal:5433"}


def _env(tmp_path: Path, **base: str) -> dict[str, str]:
    environ = {"PATH": os.environ["PATH"], **base}
    return service_environment(get_service_settings(environ), ServicePaths(tmp_path), environ)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_airflow_gets_its_secrets_from_a_private_file_not_its_environment(tmp_path: Path) -> None:
    env = _env(tmp_path)
    airflow = component_environment(env, "airflow", ServicePaths(tmp_path))
    assert not set(AIRFLOW_SECRETS) & set(airflow)
    assert not {env[var] for var in AIRFLOW_SECRETS} & set(airflow.values())
    config = Path(airflow["AIRFLOW_CONFIG"])
    assert _mode(config) == 0o600
    # Airflow itself reads them from there (a task process it forks inherits only the file's name).
    got = subprocess.run([sys.executable, "-m", "airflow", "config", "get-value", "core", "fernet_key"],
                         env={**airflow, "AIRFLOW__CORE__UNIT_TEST_MODE": "False"}, capture_output=True, text=True,
                         timeout=120)
    assert got.stdout.strip() == env["AIRFLOW__CORE__FERNET_KEY"], got.stderr[-2000:]


def test_a_secret_with_a_percent_sign_reaches_airflow_unchanged(tmp_path: Path) -> None:
    env = _env(tmp_path, AIRFLOW__API__SECRET_KEY="a%b%%c")
    airflow = component_environment(env, "airflow", ServicePaths(tmp_path))
    got = subprocess.run([sys.executable, "-m", "airflow", "config", "get-value", "api", "secret_key"],
                         env={**airflow, "AIRFLOW__CORE__UNIT_TEST_MODE": "False"}, capture_output=True, text=True,
                         timeout=120)
    assert got.stdout.strip() == "a%b%%c", got.stderr[-2000:]


@pytest.mark.parametrize("role", ["mlflow", "model-servers"])
def test_mlflow_and_the_model_servers_get_nothing_of_airflow(tmp_path: Path, role: str) -> None:
    env = _env(tmp_path, **PROD)
    scoped = component_environment(env, role, ServicePaths(tmp_path))
    assert [k for k in scoped if k.startswith("AIRFLOW")] == []
    assert scoped["KILN_HOME"] == env["KILN_HOME"]
    database_urls = {"KILN_MLFLOW_TRACKING_URI", "KILN_POOLS_DB_URL", "KILN_POSTGRES_URL"} & set(scoped)
    assert database_urls == (set() if role == "model-servers" else {"KILN_MLFLOW_TRACKING_URI", "KILN_POOLS_DB_URL",
                                                                      "KILN_POSTGRES_URL"})


def test_an_unknown_role_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="component role must be one of"):
        component_environment(_env(tmp_path), "scheduler", ServicePaths(tmp_path))


def test_task_logs_are_created_private(tmp_path: Path) -> None:
    env = _env(tmp_path)
    assert env["AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FILE_PERMISSIONS"] == "0o600"
    assert env["AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FOLDER_PERMISSIONS"] == "0o700"


def test_older_state_is_made_private_and_data_left_alone(tmp_path: Path) -> None:
    paths = ServicePaths(tmp_path)
    state = [tmp_path / "mlflow.db", tmp_path / "pools.db", tmp_path / "airflow" / "airflow.db",
             tmp_path / "airflow" / "logs" / "dag_id=x" / "attempt=1.log", tmp_path / "logs" / "service" / "mlflow.log",
             tmp_path / "serving" / "m" / "server.log"]
    data = tmp_path / "artifacts" / "run" / "model.pt"
    for path in [*state, data]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
        path.chmod(0o644)
    for folder in {p.parent for p in state} | {tmp_path}:
        folder.chmod(0o755)
    assert make_private(paths) > 0
    assert {str(p): oct(_mode(p)) for p in state if _mode(p) != 0o600} == {}
    assert {str(p.parent): oct(_mode(p.parent)) for p in state if _mode(p.parent) != 0o700} == {}
    assert _mode(tmp_path) == 0o700 and _mode(data) == 0o644
    assert make_private(paths) == 0


def test_what_the_services_create_is_private(tmp_path: Path) -> None:
    with private_umask():
        (tmp_path / "folder").mkdir()
        (tmp_path / "folder" / "file").write_text("x")
        subprocess.run(["touch", str(tmp_path / "by-a-child")], check=True)
    assert [_mode(tmp_path / p) for p in ("folder", "folder/file", "by-a-child")] == [0o700, 0o600, 0o600]


def test_restarts_back_off_and_stop_at_the_budget() -> None:
    policy = RestartPolicy(max_restarts=6, window_s=300, backoff_s=1, max_backoff_s=8)
    assert [policy.delay(n) for n in range(7)] == [0.0, 1, 2, 4, 8, 8, None]


def test_a_home_without_a_secrets_folder_gets_one(tmp_path: Path) -> None:
    """A caller that builds the environment itself (the tests' Airflow harness) has no secrets folder yet."""
    env = {"PATH": os.environ["PATH"], "AIRFLOW__CORE__FERNET_KEY": "k", "AIRFLOW__API__SECRET_KEY": "s"}
    airflow = component_environment(env, "airflow", ServicePaths(tmp_path / "home"))
    assert Path(airflow["AIRFLOW_CONFIG"]).read_text().count("= ") == 2
    assert _mode(tmp_path / "home" / "secrets") == 0o700


@pytest.mark.parametrize("base", [{}, PROD], ids=["embedded", "prod"])
def test_tasks_reach_mlflow_through_its_server_with_their_own_login_not_its_database(tmp_path: Path, base) -> None:
    """Airflow's components (and so every task) get the MLflow server's URL and kiln's login, where the server
    itself keeps the database: a task never holds a URL that bypasses MLflow's authentication."""
    env = _env(tmp_path, **base)
    airflow = component_environment(env, "airflow", ServicePaths(tmp_path))
    assert airflow["KILN_MLFLOW_TRACKING_URI"] == env["KILN_MLFLOW_SERVER_URL"]
    assert airflow["MLFLOW_TRACKING_USERNAME"] == "kiln" and airflow["MLFLOW_TRACKING_PASSWORD"]
    assert component_environment(env, "mlflow", ServicePaths(tmp_path)).get("KILN_MLFLOW_TRACKING_URI") == \
        env.get("KILN_MLFLOW_TRACKING_URI")  # the server's own store: unchanged


def test_a_tracking_server_of_the_callers_is_kept(tmp_path: Path) -> None:
    env = _env(tmp_path, KILN_MLFLOW_TRACKING_URI="https://mlflow.example.com")
    assert component_environment(env, "airflow", ServicePaths(tmp_path))["KILN_MLFLOW_TRACKING_URI"] == \
        "https://mlflow.example.com"
