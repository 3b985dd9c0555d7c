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
from pathlib import Path

import pytest

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
                "KILN_MLFLOW_ARTIFACT_ROOT", "KILN_PIPELINES_DIR", "KILN_POOLS_FILE", "KILN_POOLS_DB_URL"):
        os.environ.pop(var, None)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_STATE, ignore_errors=True)


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
