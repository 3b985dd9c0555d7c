"""The environment the platform's services run with, for the ``embedded`` and the ``prod`` profile.

Everything is configured through environment variables: a variable the caller already set wins over the
profile's default, so a production deployment overrides any of them without touching a config file. Secrets
(Airflow's Fernet key, the JWT and session secrets, the UI password) are generated once into
``$KILN_HOME/secrets`` (mode 0700, files 0600) and never printed; every component reads the same ones, since the
api-server signs the tokens the task workers present.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.fernet import Fernet

from kiln.tasks.settings import REPO_ROOT, ServiceSettings

log = logging.getLogger(__name__)

USERNAME = "admin"
#: The databases of the ``prod`` profile on ``KILN_POSTGRES_URL``.
PROD_DATABASES = {"airflow": "kiln_airflow", "mlflow": "kiln_mlflow", "pools": "kiln_pools"}
AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"


@dataclass(frozen=True)
class ServicePaths:
    """Where the services keep their state, all under ``KILN_HOME``."""

    home: Path
    """``KILN_HOME``."""

    @property
    def run_dir(self) -> Path:
        """The state file of the running services (``service.json``)."""
        return self.home / "run"

    @property
    def log_dir(self) -> Path:
        """One log file per component."""
        return self.home / "logs" / "service"

    @property
    def secrets_dir(self) -> Path:
        """Generated secrets (0700)."""
        return self.home / "secrets"

    @property
    def passwords_file(self) -> Path:
        """The UI and REST credentials: ``{"admin": "<password>"}``."""
        return self.secrets_dir / "passwords.json"


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 via a temporary name, so no reader sees a partial secret."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    tmp.replace(path)


def ensure_secrets(paths: ServicePaths) -> dict[str, str]:
    """Return the services' secrets, generating them on first use (an existing file is never replaced).

    Returns:
        ``fernet_key``, ``jwt_secret``, ``api_secret`` and ``password`` (the ``admin`` user's).
    """
    paths.secrets_dir.mkdir(parents=True, exist_ok=True)
    paths.secrets_dir.chmod(0o700)
    keys_file = paths.secrets_dir / "airflow.json"
    if not keys_file.exists():
        _write_private(keys_file, json.dumps({"fernet_key": Fernet.generate_key().decode(),
                                              "jwt_secret": secrets.token_urlsafe(64),
                                              "api_secret": secrets.token_urlsafe(32)}))
    if not paths.passwords_file.exists():
        _write_private(paths.passwords_file, json.dumps({USERNAME: secrets.token_urlsafe(16)}))
    keys = json.loads(keys_file.read_text())
    return {**keys, "password": json.loads(paths.passwords_file.read_text())[USERNAME]}


def postgres_database_url(server_url: str, database: str, driver: str = "postgresql+psycopg2") -> str:
    """``postgresql://user@host:port`` + a database name -> a SQLAlchemy URL of that database."""
    parts = urlsplit(server_url)
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
        raise ValueError(f"KILN_POSTGRES_URL must look like postgresql://user[:password]@host:port, "
                         f"found {server_url!r}")
    return f"{driver}://{parts.netloc}/{database}"


#: The variables naming the databases of the prod profile (each may point anywhere).
DATABASE_VARIABLES = ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "KILN_MLFLOW_TRACKING_URI", "KILN_POOLS_DB_URL")


def ensure_postgres_databases(env: Mapping[str, str]) -> list[str]:
    """Create each PostgreSQL database that ``DATABASE_VARIABLES`` name in ``env`` unless it exists.

    Returns:
        The databases created.

    Raises:
        RuntimeError: a server cannot be reached; the message names it, the variable and the fix.
    """
    import psycopg2
    from sqlalchemy.engine import make_url

    created = []
    for var in DATABASE_VARIABLES:
        raw = env.get(var, "")
        if not raw.startswith("postgres"):
            continue
        url = make_url(raw)
        try:
            admin = psycopg2.connect(host=url.host, port=url.port or 5432, user=url.username,
                                     password=url.password, dbname="postgres")
        except psycopg2.OperationalError as exc:
            raise RuntimeError(f"{var}: PostgreSQL at {url.host}:{url.port or 5432} does not answer "
                               f"({str(exc).strip()}); start it (make postgres) or set KILN_POSTGRES_URL") from exc
        admin.autocommit = True
        try:
            with admin.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (url.database,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{url.database}"')
                    created.append(str(url.database))
                    log.info("created PostgreSQL database %s for %s", url.database, var)
        finally:
            admin.close()
    return created


def service_environment(settings: ServiceSettings, paths: ServicePaths, base: Mapping[str, str],
                        dags_folder: Path | None = None) -> dict[str, str]:
    """The complete environment of every component: ``base`` (the caller's environment) + the profile's defaults.

    A variable set in ``base`` is kept as it is, so every default below can be overridden from the environment.
    """
    keys = ensure_secrets(paths)
    url = f"http://{settings.airflow_host}:{settings.airflow_port}"
    bin_dir = str(Path(sys.executable).parent)
    env = dict(base)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    defaults = {
        "KILN_HOME": str(paths.home),
        "KILN_PROFILE": settings.profile,
        "KILN_MLFLOW_UI_URL": f"http://127.0.0.1:{settings.mlflow_port}",
        "PYTHONUNBUFFERED": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "MPLBACKEND": "Agg",
        "AIRFLOW_HOME": str(paths.home / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder or REPO_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        # A pipeline runs when triggered, scheduled or fed: no separate unpause step after `make up`.
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__FERNET_KEY": keys["fernet_key"],
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
        "AIRFLOW__CORE__AUTH_MANAGER": AUTH_MANAGER,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USERNAME}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(paths.passwords_file),
        "AIRFLOW__API_AUTH__JWT_SECRET": keys["jwt_secret"],
        "AIRFLOW__API__SECRET_KEY": keys["api_secret"],
        "AIRFLOW__API__BASE_URL": url,
        # New spec files show up within seconds, and the scheduler loop is short: runs are started by people
        # waiting at a form or by a system waiting on REST.
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "30",
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        # An idle loop every 0.25 s (default 1 s): the next task of a run starts sooner, for a few % of one core.
        "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.25",
    }
    if base.get("KILN_S3_ENDPOINT_URL"):  # the MLflow server shows artifacts of an s3:// root from there too
        defaults["MLFLOW_S3_ENDPOINT_URL"] = base["KILN_S3_ENDPOINT_URL"]
    if settings.profile == "prod":
        pg = settings.postgres_url
        defaults.update({
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres_database_url(pg, PROD_DATABASES["airflow"]),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CELERY__BROKER_URL": settings.celery_broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": postgres_database_url(pg, PROD_DATABASES["airflow"],
                                                                     driver="db+postgresql"),
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(settings.celery_concurrency),
            "KILN_MLFLOW_TRACKING_URI": postgres_database_url(pg, PROD_DATABASES["mlflow"]),
            "KILN_POOLS_DB_URL": postgres_database_url(pg, PROD_DATABASES["pools"]),
        })
    else:
        defaults["AIRFLOW__CORE__EXECUTOR"] = "LocalExecutor"
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env
