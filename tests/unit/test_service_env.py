"""The services' environment: profile defaults, the caller's variables winning, secrets made once and private."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from kiln.tasks.services.environment import ServicePaths, service_environment
from kiln.tasks.settings import get_service_settings


def _env(tmp_path: Path, **base: str) -> dict[str, str]:
    environ = {"PATH": "/usr/bin", **base}
    return service_environment(get_service_settings(environ), ServicePaths(tmp_path), environ)


def test_embedded_profile_is_sqlite_and_local_executor(tmp_path: Path) -> None:
    env = _env(tmp_path)
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" not in env  # Airflow's own default: SQLite in AIRFLOW_HOME
    assert env["AIRFLOW_HOME"] == str(tmp_path / "airflow")
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:8080/execution/"
    assert env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] == "False"


def test_prod_profile_puts_every_store_on_postgres_and_celery_on_redis(tmp_path: Path) -> None:
    env = _env(tmp_path, KILN_PROFILE="prod", KILN_POSTGRES_URL="postgresql://ml:pw@db.internal:5433")
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == "postgresql+psycopg2://ml:pw@db.internal:5433/kiln_airflow"
    assert env["KILN_MLFLOW_TRACKING_URI"] == "postgresql+psycopg2://ml:pw@db.internal:5433/kiln_mlflow"
    assert env["KILN_POOLS_DB_URL"] == "postgresql+psycopg2://ml:pw@db.internal:5433/kiln_pools"
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"] == "db+postgresql://ml:pw@db.internal:5433/kiln_airflow"
    assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://127.0.0.1:6379/0"


def test_a_variable_the_caller_set_wins(tmp_path: Path) -> None:
    env = _env(tmp_path, KILN_PROFILE="prod", AIRFLOW__CORE__PARALLELISM="16",
               KILN_MLFLOW_TRACKING_URI="postgresql+psycopg2://other/mlflow", AIRFLOW__CORE__FERNET_KEY="mine")
    assert env["AIRFLOW__CORE__PARALLELISM"] == "16"
    assert env["KILN_MLFLOW_TRACKING_URI"] == "postgresql+psycopg2://other/mlflow"
    assert env["AIRFLOW__CORE__FERNET_KEY"] == "mine"


def test_secrets_are_generated_once_and_private(tmp_path: Path) -> None:
    first, second = _env(tmp_path), _env(tmp_path)
    for key in ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY"):
        assert first[key] == second[key] and len(first[key]) >= 32
    paths = ServicePaths(tmp_path)
    assert stat.S_IMODE(paths.secrets_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(paths.passwords_file.stat().st_mode) == 0o600
    password = json.loads(paths.passwords_file.read_text())["admin"]
    assert len(password) >= 16 and password not in json.dumps(first)


@pytest.mark.parametrize(("var", "value", "message"), [
    ("KILN_PROFILE", "production", "KILN_PROFILE must be 'embedded' or 'prod'"),
    ("KILN_CELERY_WORKERS", "0", "KILN_CELERY_WORKERS must be at least 1"),
    ("KILN_AIRFLOW_PORT", "http", "KILN_AIRFLOW_PORT must be an integer"),
], ids=["profile", "workers", "port"])
def test_bad_settings_name_the_variable(var: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_service_settings({var: value})
