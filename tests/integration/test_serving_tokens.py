"""Who may do what on a real model server: the kiln token (every right), scoped tokens from the tokens file
(``predict`` or ``admin``, for some pipelines), 401 without a known token, 403 with one that lacks the scope or the
pipeline, and a rotation that never refuses a client while both tokens are valid.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from serving_fixtures import ServerProcess, bundle_factory, records, start_server_process  # noqa: F401

from kiln.tasks.serving.deployment import Deployment, ModelRef, utc_now, write_deployment
from kiln.tasks.serving.tokens import TOKENS_FILE, add_token, revoke_token

pytestmark = pytest.mark.integration

KILN_TOKEN = "kiln-token-of-the-tokens-test"
PIPELINE = "penguins"
#: How long a change of the tokens file may take to reach the server (it checks the file every second).
PICKUP_S = 5.0


@pytest.fixture(scope="module")
def serving_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serving")


@pytest.fixture(scope="module")
def tokens(serving_dir) -> dict[str, str]:
    """Tokens written before the server starts, by role."""
    path = serving_dir / TOKENS_FILE
    return {
        "predict": add_token(path, "shop-frontend", ["predict"], [PIPELINE]),
        "admin": add_token(path, "ops-reload", ["admin"], ["*"]),
        "other_pipeline": add_token(path, "taxi-frontend", ["predict", "admin"], ["taxi_fares"]),
    }


@pytest.fixture(scope="module")
def server(bundle_factory, serving_dir, tokens) -> Iterator[ServerProcess]:  # noqa: F811
    deployment = serving_dir / "deployment.json"
    write_deployment(deployment, Deployment(PIPELINE, ModelRef("1", str(bundle_factory(0))), None, utc_now()))
    # The tokens file is found in its default place, under KILN_SERVING_DIR.
    proc = start_server_process(deployment, serving_dir / "server.log",
                                env={"KILN_SERVE_TOKEN": KILN_TOKEN, "KILN_SERVING_DIR": str(serving_dir)})
    try:
        yield proc
    finally:
        proc.stop()


def call(server: ServerProcess, action: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if action == "predict":
        return httpx.post(f"{server.url}/predict", json={"records": records(1)}, headers=headers, timeout=30)
    if action == "reload":
        return httpx.post(f"{server.url}/admin/reload", headers=headers, timeout=60)
    return httpx.get(f"{server.url}/admin/stats", headers=headers, timeout=30)


@pytest.mark.parametrize(("who", "action", "status"), [
    ("kiln", "predict", 200), ("kiln", "reload", 200), ("kiln", "stats", 200),
    ("predict", "predict", 200), ("predict", "reload", 403), ("predict", "stats", 403),
    ("admin", "predict", 403), ("admin", "reload", 200), ("admin", "stats", 200),
    ("other_pipeline", "predict", 403), ("other_pipeline", "reload", 403),
    ("unknown", "predict", 401), ("unknown", "reload", 401), ("none", "predict", 401), ("none", "stats", 401),
])
def test_each_token_opens_what_its_scopes_and_pipelines_allow(server, tokens, who, action, status):
    fixed = {"kiln": KILN_TOKEN, "unknown": "not-a-known-token", "none": None}
    token = fixed[who] if who in fixed else tokens[who]

    response = call(server, action, token)

    assert response.status_code == status, response.text
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
    if status == 403:
        detail = response.json()["detail"]
        assert ("'admin'" in detail or "'predict'" in detail) if who != "other_pipeline" else PIPELINE in detail
        assert token not in response.text  # the token's name, never the token


def test_a_rotation_keeps_every_request_answered(server, serving_dir):
    path = serving_dir / TOKENS_FILE
    old = add_token(path, "rotating-v1", ["predict"], [PIPELINE])
    wait_for_status(server, old, 200)
    statuses: list[int] = []
    current = {"token": old}
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while not stop.is_set():
                response = http.post("/predict", json={"records": records(1)},
                                     headers={"Authorization": f"Bearer {current['token']}"})
                statuses.append(response.status_code)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        new = add_token(path, "rotating-v2", ["predict"], [PIPELINE])
        wait_for_status(server, new, 200)
        assert call(server, "predict", old).status_code == 200  # both valid during the rotation
        current["token"] = new  # the client moves to the new token
        time.sleep(0.5)
        assert revoke_token(path, "rotating-v1")
        wait_for_status(server, old, 401)
    finally:
        stop.set()
        thread.join(timeout=30)

    assert len(statuses) > 10 and set(statuses) == {200}
    assert call(server, "predict", new).status_code == 200


def test_an_invalid_tokens_file_keeps_the_tokens_read_before(server, serving_dir, tokens):
    path = serving_dir / TOKENS_FILE
    before = path.read_bytes()
    try:
        path.write_text('{"tokens": [{"name": "broken", "scopes": ["everything"]}]}')
        deadline = time.monotonic() + PICKUP_S
        while "cannot be used" not in server.log_text():
            assert time.monotonic() < deadline, "the server did not report the invalid tokens file"
            time.sleep(0.2)

        assert call(server, "predict", tokens["predict"]).status_code == 200
    finally:
        path.write_bytes(before)
    assert str(path) in server.log_text()


def test_a_server_with_an_invalid_tokens_file_does_not_start(bundle_factory, tmp_path):  # noqa: F811
    deployment = write_deployment(tmp_path / "deployment.json",
                                  Deployment(PIPELINE, ModelRef("1", str(bundle_factory(0))), None, utc_now()))
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text('{"tokens": [{"name": "x", "sha256": "abc", "scopes": ["predict"], "pipelines": ["*"]}]}')

    done = subprocess.run([sys.executable, "-m", "kiln.tasks.serving", "--deployment", str(deployment), "--port",
                           str(free_port()), "--tokens-file", str(tokens_file)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "KILN_SERVE_TOKEN": KILN_TOKEN})

    assert done.returncode == 2, done.stderr
    assert str(tokens_file) in done.stderr and "tokens[0].sha256" in done.stderr


def wait_for_status(server: ServerProcess, token: str, status: int) -> None:
    deadline = time.monotonic() + PICKUP_S
    while (got := call(server, "predict", token).status_code) != status:
        assert time.monotonic() < deadline, f"the token still gets {got}, not {status}, after {PICKUP_S} s"
        time.sleep(0.1)
