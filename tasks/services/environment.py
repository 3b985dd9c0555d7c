"""The environment the platform's services run with, for the ``embedded`` and the ``prod`` profile.

Everything is configured through environment variables: a variable the caller already set wins over the
profile's default, so a production deployment overrides any of them without touching a config file. Secrets
(Airflow's Fernet key, the JWT and session secrets, the UI password) are generated once into
``$KILN_HOME/secrets`` (mode 0700, files 0600) and never printed; every Airflow component reads the same ones,
since the api-server signs the tokens the task workers present. Only Airflow's components get them, and from a
private config file, not their environment (:func:`component_environment`): nothing they start (a task, the model
server a deploy task starts) inherits them, and MLflow and the model servers never see them.
"""

from __future__ import annotations

import configparser
import io
import json
import logging
import os
import secrets
import stat
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.fernet import Fernet

from kiln.tasks.settings import REPO_ROOT, ServiceSettings

log = logging.getLogger(__name__)

USERNAME = "admin"
#: The databases of the ``prod`` profile on ``KILN_POSTGRES_URL``.
PROD_DATABASES = {"airflow": "kiln_airflow", "mlflow": "kiln_mlflow", "pools": "kiln_pools"}
#: The embedded profile's auth manager: Airflow's simple one, one ``admin`` (its documentation calls it
#: development-only).
AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
#: The prod profile's: Airflow's FAB auth manager with roles per team and throttled logins
#: (``kiln.tasks.services.auth``).
FAB_AUTH_MANAGER = "kiln.operators.auth_manager.KilnFabAuthManager"
#: FAB's default throttle of its login form; kiln applies it to failed token requests too, per client address.
AUTH_RATE_LIMIT = "5 per 40 second"


#: Airflow's secrets: variable -> (section, option) of Airflow's config. Only Airflow's components hold them.
AIRFLOW_SECRETS = {"AIRFLOW__CORE__FERNET_KEY": ("core", "fernet_key"),
                   "AIRFLOW__API_AUTH__JWT_SECRET": ("api_auth", "jwt_secret"),
                   "AIRFLOW__API__SECRET_KEY": ("api", "secret_key")}
#: The kinds of component, by the secrets they get (:func:`component_environment`).
ROLES = ("airflow", "mlflow", "model-servers")
#: The mode bits nobody but the user gets on what the services create (files 0600, folders 0700).
PRIVATE_UMASK = 0o077


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

    @property
    def airflow_config(self) -> Path:
        """Airflow's secrets as an Airflow config file (``AIRFLOW_CONFIG`` of Airflow's components)."""
        return self.secrets_dir / "airflow.cfg"

    @property
    def private_trees(self) -> list[Path]:
        """The folders under ``KILN_HOME`` that hold state (databases, secrets, logs, pid files): private."""
        return [self.home / "airflow", self.home / "logs", self.run_dir, self.secrets_dir, self.home / "serving"]


def write_private(path: Path, text: str) -> None:
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
        write_private(keys_file, json.dumps({"fernet_key": Fernet.generate_key().decode(),
                                              "jwt_secret": secrets.token_urlsafe(64),
                                              "api_secret": secrets.token_urlsafe(32)}))
    if not paths.passwords_file.exists():
        write_private(paths.passwords_file, json.dumps({USERNAME: secrets.token_urlsafe(16)}))
    keys = json.loads(keys_file.read_text())
    return {**keys, "password": json.loads(paths.passwords_file.read_text())[USERNAME]}


#: kiln's own user on the MLflow server (its tasks and jobs, over HTTP); people log in as ``admin``.
MLFLOW_TASK_USER = "kiln"
#: The URL of the MLflow server the services run, for :func:`component_environment` (internal to kiln up).
MLFLOW_SERVER_VARIABLE = "KILN_MLFLOW_SERVER_URL"


def ensure_mlflow_credentials(paths: ServicePaths) -> dict[str, str]:
    """The MLflow server's users (``admin`` for people, :data:`MLFLOW_TASK_USER` for kiln) and their passwords,
    generated once into ``secrets/mlflow.json`` (0600; an existing file is never replaced)."""
    paths.secrets_dir.mkdir(parents=True, exist_ok=True)
    paths.secrets_dir.chmod(0o700)
    path = paths.secrets_dir / "mlflow.json"
    if not path.exists():
        write_private(path, json.dumps({USERNAME: secrets.token_urlsafe(24),
                                         MLFLOW_TASK_USER: secrets.token_urlsafe(24)}))
    return json.loads(path.read_text())


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


def component_environment(env: Mapping[str, str], role: str, paths: ServicePaths) -> dict[str, str]:
    """The environment of one kind of component: ``env`` (:func:`service_environment`) less what it must not hold.

    Args:
        env: the complete environment.
        role: ``airflow``: Airflow's secrets move from the environment to ``paths.airflow_config`` (mode 0600), named
            by ``AIRFLOW_CONFIG``, so the processes an Airflow component starts inherit none (unless the caller
            set ``AIRFLOW_CONFIG``: then the secrets stay where the caller put them). ``mlflow``: no ``AIRFLOW*``
            variable. ``model-servers`` (the watchdog, and the servers it starts): neither, nor a database URL.
        paths: where the config file goes.

    Raises:
        ValueError: an unknown role.
    """
    if role not in ROLES:
        raise ValueError(f"component role must be one of {ROLES}, found {role!r}")
    if role == "airflow":
        if "AIRFLOW_CONFIG" in env:
            return _through_mlflow_server(dict(env))
        scoped = {k: v for k, v in env.items() if k not in AIRFLOW_SECRETS}
        config = configparser.ConfigParser()
        for var, (section, option) in AIRFLOW_SECRETS.items():
            if var in env:
                if not config.has_section(section):
                    config.add_section(section)
                config.set(section, option, env[var].replace("%", "%%"))  # Airflow's parser interpolates
        text = io.StringIO()
        config.write(text)
        paths.secrets_dir.mkdir(parents=True, exist_ok=True)
        paths.secrets_dir.chmod(0o700)
        write_private(paths.airflow_config, text.getvalue())
        scoped["AIRFLOW_CONFIG"] = str(paths.airflow_config)
        return _through_mlflow_server(scoped)
    if role == "model-servers":
        from kiln.tasks.serving.process import server_environment

        return server_environment(env)
    return {k: v for k, v in env.items() if not k.startswith("AIRFLOW")}


def _through_mlflow_server(env: dict[str, str]) -> dict[str, str]:
    """Point the tracking URI of Airflow's components at the MLflow server when it names the server's database:
    kiln's tasks then write to MLflow as its user ``kiln`` (``MLFLOW_TRACKING_USERNAME``), through the server's
    authentication, and never hold a database URL that bypasses it. A tracking server of the caller's is kept."""
    server = env.get(MLFLOW_SERVER_VARIABLE)
    tracking = env.get("KILN_MLFLOW_TRACKING_URI", "")
    if server and not tracking.startswith(("http://", "https://")):
        env["KILN_MLFLOW_TRACKING_URI"] = server
    return env


def make_private(paths: ServicePaths) -> int:
    """Take group and other access away from the services' state made before (an older kiln, another umask):
    ``KILN_HOME``, the SQLite databases in it and everything in :attr:`ServicePaths.private_trees`. Data
    (artifacts, MLflow's artifacts) is left as it is: training containers may run as another user.

    Returns:
        How many files and folders were changed.
    """
    changed = 0
    found = [paths.home, *paths.home.glob("*.db"), *paths.home.glob("*.db-*")]
    for tree in paths.private_trees:
        if tree.is_dir():
            found += [tree, *tree.rglob("*")]
    for path in found:
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
            path.chmod(stat.S_IMODE(st.st_mode) & ~0o077)
            changed += 1
    if changed:
        log.info("made %d files and folders under %s private (no group or other access)", changed, paths.home)
    return changed


@contextmanager
def private_umask() -> Iterator[None]:
    """Files and folders created meanwhile, also by the processes started meanwhile (they inherit the umask, and so
    does all they start: tasks, model servers), are the user's alone: 0600 and 0700."""
    old = os.umask(PRIVATE_UMASK)
    try:
        yield
    finally:
        os.umask(old)


def service_environment(settings: ServiceSettings, paths: ServicePaths, base: Mapping[str, str],
                        dags_folder: Path | None = None) -> dict[str, str]:
    """The complete environment of every component: ``base`` (the caller's environment) + the profile's defaults.

    A variable set in ``base`` is kept as it is, so every default below can be overridden from the environment.
    """
    keys = ensure_secrets(paths)
    mlflow_users = ensure_mlflow_credentials(paths)
    url = f"http://{settings.airflow_host}:{settings.airflow_port}"
    bin_dir = str(Path(sys.executable).parent)
    env = dict(base)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    defaults = {
        "KILN_HOME": str(paths.home),
        "KILN_PROFILE": settings.profile,
        "KILN_MLFLOW_UI_URL": f"http://127.0.0.1:{settings.mlflow_port}",
        # The MLflow server `kiln up` runs: Airflow's components (so the tasks) reach the tracking store through it.
        MLFLOW_SERVER_VARIABLE: f"http://127.0.0.1:{settings.mlflow_port}",
        # kiln's own credentials on the MLflow server (MLflow's client reads these for an http:// tracking URI).
        "MLFLOW_TRACKING_USERNAME": MLFLOW_TASK_USER,
        "MLFLOW_TRACKING_PASSWORD": mlflow_users[MLFLOW_TASK_USER],
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
        # Read by the FAB auth manager only (the prod profile's, or one the caller names).
        "AIRFLOW__FAB__AUTH_RATE_LIMITED": "True",
        "AIRFLOW__FAB__AUTH_RATE_LIMIT": AUTH_RATE_LIMIT,
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
        # Task logs: Airflow sets each new log's mode itself (default 0664), whatever the umask.
        "AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FILE_PERMISSIONS": "0o600",
        "AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FOLDER_PERMISSIONS": "0o700",
    }
    if base.get("KILN_S3_ENDPOINT_URL"):  # the MLflow server shows artifacts of an s3:// root from there too
        defaults["MLFLOW_S3_ENDPOINT_URL"] = base["KILN_S3_ENDPOINT_URL"]
    if settings.profile == "prod":
        pg = settings.postgres_url
        defaults.update({
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres_database_url(pg, PROD_DATABASES["airflow"]),
            "AIRFLOW__CORE__AUTH_MANAGER": FAB_AUTH_MANAGER,
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
