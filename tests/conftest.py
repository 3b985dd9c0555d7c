"""Test session set-up: every test runs against its own state folder, never the user's ``var/``.

Airflow reads its configuration when first imported, so the environment is set in ``pytest_configure``, before
any test module imports airflow. The Airflow metadata DB is migrated only when a test needs it
(``airflow_db`` fixture), so unit tests stay fast.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.tasks.processes import free_port

REPO = Path(__file__).resolve().parents[1]
_STATE = Path(tempfile.mkdtemp(prefix="kiln-test-"))


def pytest_configure(config: pytest.Config) -> None:
    os.environ.update(
        KILN_HOME=str(_STATE / "kiln"),
        AIRFLOW_HOME=str(_STATE / "airflow"),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__UNIT_TEST_MODE="False",
        GX_ANALYTICS_ENABLED="false",
        MPLBACKEND="Agg",
    )
    for var in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "KILN_ARTIFACT_ROOT", "KILN_MLFLOW_TRACKING_URI",
                "KILN_MLFLOW_ARTIFACT_ROOT", "KILN_PIPELINES_DIR", "KILN_POOLS_FILE", "KILN_POOLS_DB_URL",
                "KILN_SERVING_DIR", "KILN_SERVE_HOST", "KILN_SERVE_TOKEN", "KILN_S3_ENDPOINT_URL",
                "KILN_S3_CONNECTION_ID"):
        os.environ.pop(var, None)
    # Model servers that the deploy steps start listen here, not on the default port a user's server may hold.
    os.environ["KILN_SERVE_PORT"] = str(free_port())


def pytest_unconfigure(config: pytest.Config) -> None:
    stop_model_servers(_STATE / "kiln" / "serving")
    shutil.rmtree(_STATE, ignore_errors=True)


def stop_model_servers(serving_dir: Path) -> None:
    """Stop every detached model server that the deploy steps started under ``serving_dir``."""
    from kiln.tasks.serving.process import stop_servers

    stop_servers(serving_dir)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata DB (SQLite) in the session's own AIRFLOW_HOME."""
    home = Path(os.environ["AIRFLOW_HOME"])
    marker = home / ".migrated"
    if not marker.exists():
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        marker.touch()
    return home


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database ``kiln_test_<random>`` for the session, dropped at its end.

    The server is ``KILN_TEST_POSTGRES_URL`` (default: the local one, superuser ``postgres``, trust auth). Tests
    that need it fail, never skip, when it does not answer: ``make test`` must exercise them.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    admin_url = os.environ.get("KILN_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    name = f"kiln_test_{uuid.uuid4().hex[:12]}"
    problem = None
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        problem = str(exc.orig).strip()
    if problem is not None:
        admin.dispose()
        pytest.fail(f"PostgreSQL does not answer at {make_url(admin_url).render_as_string()}: {problem}\n"
                    "run `make postgres` to start the local server (or set KILN_TEST_POSTGRES_URL)", pytrace=False)
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
