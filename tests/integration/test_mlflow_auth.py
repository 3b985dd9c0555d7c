"""The MLflow server of service mode (``make up``) requires credentials: an anonymous request that moves
``@champion`` is refused, kiln's own user (generated once into the secrets folder, mode 0600) may write.

The server is started as the supervisor starts it (``python -m kiln.tasks.services.mlflow_server ...``), on a port
and a ``KILN_HOME`` of its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

ALIAS = "/api/2.0/mlflow/registered-models/alias"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    from conftest import free_port
    from mlflow import MlflowClient

    home = tmp_path_factory.mktemp("mlflow-auth-home")
    store = f"sqlite:///{home / 'mlflow.db'}"
    # A model with a version, made the way kiln's tasks make it (straight into the tracking store).
    client = MlflowClient(store, registry_uri=store)
    client.create_registered_model("m")
    client.create_model_version("m", source=(home / "bundle").as_uri())
    client.create_model_version("m", source=(home / "bundle").as_uri())
    port = free_port()
    env = {**os.environ, "KILN_HOME": str(home), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(var, None)
    log = (home / "mlflow.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln.tasks.services.mlflow_server", "--backend-store-uri", store,
         "--default-artifact-root", (home / "mlartifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (home / "mlflow.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (home / "mlflow.log").read_text()[-3000:]
            time.sleep(0.5)
        yield url, home
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _credentials(home: Path) -> dict[str, str]:
    path = home / "secrets" / "mlflow.json"
    assert path.stat().st_mode & 0o777 == 0o600
    return json.loads(path.read_text())


def test_anonymous_writes_are_refused(server: tuple[str, Path]) -> None:
    url, home = server
    move = {"name": "m", "alias": "champion", "version": "2"}
    anonymous = httpx.post(f"{url}{ALIAS}", json=move, timeout=10)
    assert anonymous.status_code in (401, 403), anonymous.text
    assert httpx.get(f"{url}/api/2.0/mlflow/registered-models/get", params={"name": "m"},
                     timeout=10).status_code in (401, 403)
    wrong = httpx.post(f"{url}{ALIAS}", json=move, auth=("kiln", "not-the-password"), timeout=10)
    assert wrong.status_code in (401, 403)


def test_kilns_own_user_may_write(server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from kiln.tasks.services.environment import MLFLOW_TASK_USER, ServicePaths, service_environment
    from kiln.tasks.settings import get_service_settings

    url, home = server
    creds = _credentials(home)
    assert set(creds) == {"admin", MLFLOW_TASK_USER} and len(set(creds.values())) == 2
    # Every component of the services gets kiln's credentials, in MLflow's own variables.
    env = service_environment(get_service_settings({}), ServicePaths(home), {})
    assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == (MLFLOW_TASK_USER,
                                                                                  creds[MLFLOW_TASK_USER])
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", MLFLOW_TASK_USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", creds[MLFLOW_TASK_USER])
    client = MlflowClient(url, registry_uri=url)
    client.set_registered_model_alias("m", "champion", "1")
    assert client.get_model_version_by_alias("m", "champion").version == "1"
    assert httpx.get(f"{url}/api/2.0/mlflow/registered-models/get", params={"name": "m"},
                     auth=("admin", creds["admin"]), timeout=10).status_code == 200


def test_verified_credentials_are_cached_and_a_changed_password_is_refused_at_once(
        server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every REST call of kiln's jobs and tasks authenticates, and MLflow's password check (scrypt) costs ~150 ms of
    server CPU each: a training job's per-epoch metrics spent most of their time there. MLflow's own credential
    cache is on; it keys on the password's HMAC, so a wrong password still fails, and the one worker drops a user's
    entries when the password changes through the API."""
    from mlflow.server.auth.config import read_auth_config

    from kiln.tasks.services.mlflow_server import AUTH_CACHE_TTL_S, AUTH_CONFIG_FILE

    url, home = server
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(home / "secrets" / AUTH_CONFIG_FILE))
    assert read_auth_config().auth_cache_ttl_seconds == AUTH_CACHE_TTL_S > 0
    admin = ("admin", _credentials(home)["admin"])
    users = f"{url}/api/2.0/mlflow/users"
    created = httpx.post(f"{users}/create", json={"username": "probe", "password": "first-password-123"},
                         auth=admin, timeout=10)
    assert created.status_code == 200, created.text
    model = f"{url}/api/2.0/mlflow/registered-models/get"
    for _ in range(3):  # the first verifies and caches; the next two are served from the cache
        assert httpx.get(model, params={"name": "m"}, auth=("probe", "first-password-123"), timeout=10).status_code \
            == 200
    assert httpx.get(model, params={"name": "m"}, auth=("probe", "first-password-124"), timeout=10).status_code \
        == 401
    changed = httpx.patch(f"{users}/update-password", json={"username": "probe", "password": "second-password-456"},
                          auth=admin, timeout=10)
    assert changed.status_code == 200, changed.text
    assert httpx.get(model, params={"name": "m"}, auth=("probe", "first-password-123"), timeout=10).status_code \
        == 401
    assert httpx.get(model, params={"name": "m"}, auth=("probe", "second-password-456"), timeout=10).status_code \
        == 200
