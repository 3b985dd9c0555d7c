"""``python -m kiln.tasks.services.mlflow_server ARGS`` is ``mlflow server --app-name basic-auth ARGS`` in one
process instead of two.

Authentication: the server runs MLflow's basic-auth app, so every request but ``/health`` and static files needs a
user; an anonymous request (the ``curl`` that once moved ``@champion`` to a rejected version) gets 401. The users
are generated once into ``$KILN_HOME/secrets/mlflow.json`` (0600): ``admin`` for people (the UI asks for it) and
``kiln`` for kiln's own tasks and jobs, which the services pass as ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD``. Both are MLflow admins (kiln writes every pipeline's model); a user added later gets
``READ`` by default. The auth app's config and its user database sit in the same private folder.

Verified credentials are cached (MLflow's ``auth_cache_ttl_seconds``, :data:`AUTH_CACHE_TTL_S`): MLflow stores
passwords as scrypt hashes, whose check costs about 150 ms of server CPU by design, and every REST call of kiln's
tasks and jobs authenticates (a training job logs its metrics every epoch: without the cache, most of a small job's
time went to its server's password checks). The cache keys on the password's HMAC under a per-process key, so a
wrong password still fails, and the server runs one worker, which drops a user's entries when their password, admin
flag or account changes through MLflow's API; a change made straight in the user database takes up to the TTL.

One process: ``mlflow server`` prepares its settings, then starts uvicorn as a child process and waits for it: the
waiting parent keeps MLflow imported (about 200 MB) for nothing. Here the same preparation runs, and its final
spawn becomes an ``exec``: uvicorn replaces this process (same pid, same environment additions), so the service
supervisor tracks and stops the server itself.
"""

from __future__ import annotations

import configparser
import io
import logging
import os
import sys
from pathlib import Path
from typing import Any

from kiln.tasks.services.environment import write_private

log = logging.getLogger(__name__)

AUTH_CONFIG_FILE = "mlflow_auth.ini"
AUTH_DB_FILE = "mlflow_auth.db"
#: The auth app's Flask session/CSRF key, generated once (MLflow refuses to start the app without one).
FLASK_KEY_FILE = "mlflow_flask_key"
#: How long the server trusts a verified user/password pair without checking its hash again (module docstring).
AUTH_CACHE_TTL_S = 300


def _exec_instead(cmd: list[str], *, extra_env: dict[str, str] | None = None, **_ignored: Any) -> None:
    os.execvpe(cmd[0], cmd, {**os.environ, **(extra_env or {})})


def flask_secret_key(secrets_dir: Path) -> str:
    """The auth app's session key, generated once into the secrets folder (0600)."""
    import secrets

    path = secrets_dir / FLASK_KEY_FILE
    if not path.exists():
        write_private(path, secrets.token_urlsafe(48))
    return path.read_text().strip()


def ensure_auth(secrets_dir: Path, users: dict[str, str], admin: str, task_user: str) -> Path:
    """Write the auth app's config (mode 0600), point ``MLFLOW_AUTH_CONFIG_PATH`` at it, and make sure kiln's own
    user exists; returns the config file.

    The ``admin`` user is created by MLflow itself on its first start, from the config. MLflow's auth package reads
    the config when it is first imported, so this runs before anything imports it.

    Args:
        secrets_dir: the private folder (0700) for the config and the user database.
        users: user -> password (``admin`` and ``task_user``).
        admin: the admin user's name.
        task_user: kiln's own user.
    """
    database = f"sqlite:///{secrets_dir / AUTH_DB_FILE}"
    config = configparser.ConfigParser(interpolation=None)
    config["mlflow"] = {"default_permission": "READ", "database_uri": database, "admin_username": admin,
                        "admin_password": users[admin],
                        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
                        "auth_cache_ttl_seconds": str(AUTH_CACHE_TTL_S)}
    text = io.StringIO()
    config.write(text)
    path = secrets_dir / AUTH_CONFIG_FILE
    write_private(path, text.getvalue())
    os.environ["MLFLOW_AUTH_CONFIG_PATH"] = str(path)

    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore()
    store.init_db(database)
    if not store.has_user(task_user):
        store.create_user(task_user, users[task_user], is_admin=True)
        log.info("created MLflow user %s", task_user)
    (secrets_dir / AUTH_DB_FILE).chmod(0o600)
    return path


def main() -> None:
    """Run MLflow's ``server`` command with authentication and its uvicorn spawn replaced by an exec."""
    from kiln.tasks.services.environment import (
        MLFLOW_TASK_USER,
        USERNAME,
        ServicePaths,
        ensure_mlflow_credentials,
    )
    from kiln.tasks.settings import get_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:]
    if "--app-name" not in args:
        paths = ServicePaths(get_settings().home)
        users = ensure_mlflow_credentials(paths)
        ensure_auth(paths.secrets_dir, users, USERNAME, MLFLOW_TASK_USER)
        os.environ.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", flask_secret_key(paths.secrets_dir))
        args = ["--app-name", "basic-auth", *args]
    import mlflow.server
    from mlflow.cli import cli

    # mlflow.server calls this module-level name once, as the last step of `_run_server`; if a future MLflow
    # renames it, the server still starts, as two processes.
    if hasattr(mlflow.server, "_exec_cmd"):
        mlflow.server._exec_cmd = _exec_instead  # type: ignore[attr-defined]
    cli(args=["server", *args], prog_name="mlflow")


if __name__ == "__main__":
    main()
