"""The model server as users meet it: a real ``python -m kiln.tasks.serving`` process on a loopback port, serving real
bundles of tiny models trained in the test session, called over HTTP.

One server serves the whole module; each test first writes the deployment it needs and reloads it (which also
resets the statistics), so the tests do not depend on their order. The fixture stops the server with SIGTERM and
checks that it exits cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families
from serving_fixtures import (  # noqa: F401
    POISON_BILL_LENGTH,
    assert_same_predictions,
    bundle_factory,
    expected_predictions,
    make_failing_bundle,
    records,
)

from kiln.tasks.serving.deployment import Canary, Deployment, ModelRef, utc_now, write_deployment

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TOKEN = "integration-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BATCH = 64
START_TIMEOUT_S = 90.0


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def server_env() -> dict[str, str]:
    return {**os.environ, "KILN_SERVE_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    deployment: Path
    log: Path
    http: httpx.Client

    def log_tail(self) -> str:
        return self.log.read_text()[-3000:]

    def deploy(self, champion: ModelRef, canary: Canary | None = None) -> dict[str, Any]:
        """Write the deployment file and reload it; the reload's body."""
        write_deployment(self.deployment, Deployment("penguins", champion, canary, utc_now()))
        response = self.http.post("/admin/reload", headers=AUTH)
        assert response.status_code == 200, f"{response.status_code} {response.text}\n{self.log_tail()}"
        return response.json()

    def predict(self, rows: list[dict[str, Any]], **kwargs: Any) -> httpx.Response:
        return self.http.post("/predict", json={"records": rows}, headers=kwargs.pop("headers", AUTH), **kwargs)

    def stats(self) -> dict[str, Any]:
        response = self.http.get("/admin/stats", headers=AUTH)
        assert response.status_code == 200, response.text
        return response.json()


def start_server(deployment: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kiln.tasks.serving", "--deployment", str(deployment), "--host",
                                 "127.0.0.1", "--port", str(port), *extra], cwd=REPO, env=server_env(),
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, f"the server exited with code {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            return httpx.get(f"{url}/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, START_TIMEOUT_S, f"the server on {url} to be ready")
    return proc, url


def stop_server(proc: subprocess.Popen, log: Path) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the server did not stop within 30 s of SIGTERM:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def bundles(bundle_factory, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    v1, v2 = bundle_factory(0), bundle_factory(1)
    root = tmp_path_factory.mktemp("failing-bundles")
    return {"1": v1, "2": v2,
            "poison": make_failing_bundle(v1, root / "poison", fails_on="poison"),
            "always": make_failing_bundle(v1, root / "always", fails_on="always")}


def ref(bundles: dict[str, Path], version: str) -> ModelRef:
    return ModelRef(version, str(bundles[version]))


@pytest.fixture(scope="module")
def server(bundles, tmp_path_factory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("server")
    deployment, log = root / "deployment.json", root / "server.log"
    write_deployment(deployment, Deployment("penguins", ref(bundles, "1"), None, utc_now()))
    proc, url = start_server(deployment, log, "--max-batch", str(MAX_BATCH), "--seed", "7")
    with httpx.Client(base_url=url, timeout=30) as http:
        try:
            yield Server(proc, url, deployment, log, http)
        finally:
            code = stop_server(proc, log)
    # uvicorn shuts down gracefully, then ends the process by the signal it caught (exit status -SIGTERM).
    assert code in (0, -signal.SIGTERM), f"the server exited with code {code} after SIGTERM:\n{log.read_text()}"
    assert "Application shutdown complete" in log.read_text()


@pytest.mark.parametrize("n", [1, 32], ids=["one_record", "batch_of_32"])
def test_predictions_equal_the_bundles_own(server, bundles, n):
    server.deploy(ref(bundles, "1"))
    rows = records(n, seed=n)

    response = server.predict(rows)

    assert response.status_code == 200, response.text
    body = response.json()
    assert {k: body[k] for k in ("model", "version", "variant")} == {"model": "penguins", "version": "1",
                                                                    "variant": "champion"}
    assert_same_predictions(body["predictions"], expected_predictions(bundles["1"], rows))


@pytest.mark.parametrize("path", ["/predict", "/admin/reload", "/admin/stats"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN}],
                         ids=["no_token", "wrong_token", "no_bearer_prefix"])
def test_a_request_without_the_token_is_refused(server, path, headers):
    method = "GET" if path == "/admin/stats" else "POST"

    response = server.http.request(method, path, json={"records": records(1)}, headers=headers)

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert TOKEN not in response.text


def test_the_token_opens_predict(server, bundles):
    server.deploy(ref(bundles, "1"))
    assert server.predict(records(1)).status_code == 200


@pytest.mark.parametrize(("body", "field"), [
    ({"records": [{**records(1)[0], "bill_length_mm": "long"}]}, "records[0].bill_length_mm"),
    ({"records": [{k: v for k, v in records(1)[0].items() if k != "island"}]}, "records[0].island"),
    ({"records": []}, "records"),
    ({"rows": records(1)}, "records"),
    ({"records": [records(1)[0], [1, 2, 3]]}, "records[1]"),
    ([records(1)[0]], "body"),
    (b'{"records": [', "body"),
], ids=["wrong_type", "missing_column", "empty_records", "no_records_key", "record_not_an_object",
        "body_not_an_object", "bad_json"])
def test_invalid_requests_get_422_naming_the_field(server, bundles, body, field):
    server.deploy(ref(bundles, "1"))
    content = body if isinstance(body, bytes) else httpx.Request("POST", "/", json=body).content

    response = server.http.post("/predict", content=content, headers={**AUTH, "Content-Type": "application/json"})

    assert response.status_code == 422, response.text
    assert field in [e["field"] for e in response.json()["detail"]]


def test_a_request_over_max_batch_records_gets_413(server, bundles):
    server.deploy(ref(bundles, "1"))

    response = server.predict(records(1) * (MAX_BATCH + 1))

    assert response.status_code == 413
    assert str(MAX_BATCH) in response.json()["detail"]


def metric_samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_health_ready_and_metrics_report_the_served_model_and_its_traffic(server, bundles):
    server.deploy(ref(bundles, "1"))
    before = metric_samples(server.http.get("/metrics").text)
    for _ in range(3):
        assert server.predict(records(2)).status_code == 200
    assert server.predict(records(1), headers={}).status_code == 401

    assert server.http.get("/health").json() == {"status": "ok"}
    assert server.http.get("/ready").json() == {"model": "penguins", "champion": {"version": "1", "runtime": "onnx"},
                                                "canary": None}
    response = server.http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    after = metric_samples(response.text)

    def grew(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after[key] - before.get(key, 0.0)

    assert grew("kiln_serve_requests_total", variant="champion", version="1", status="200") == 3
    assert grew("kiln_serve_records_predicted_total", variant="champion", version="1") == 6
    assert grew("kiln_serve_refused_requests_total", status="401") == 1
    assert grew("kiln_serve_request_duration_seconds_count", variant="champion") == 3
    assert grew("kiln_serve_batch_rows_count", variant="champion") == 3
    assert grew("kiln_serve_batch_rows_sum", variant="champion") == 6
    assert grew("kiln_serve_reloads_total", outcome="ok") == 0
    assert after[("kiln_serve_model_loaded", frozenset({"variant": "champion", "version": "1"}.items()))] == 1
    assert after[("kiln_serve_canary_share", frozenset())] == 0
    assert after[("kiln_serve_in_flight", frozenset())] == 0  # every request, the refused one too, was counted out


def test_a_hot_swap_under_load_fails_no_request(server, bundles):
    server.deploy(ref(bundles, "1"))
    stop = threading.Event()
    seen: list[list[str]] = [[] for _ in range(4)]
    failures: list[str] = []

    def client(versions: list[str]) -> None:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:  # keep-alive connection
            while not stop.is_set():
                try:
                    response = http.post("/predict", json={"records": records(3)})
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text}")
                else:
                    versions.append(response.json()["version"])

    threads = [threading.Thread(target=client, args=(versions,), daemon=True) for versions in seen]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: all(len(v) >= 5 for v in seen), 60, "every client to be answered")
        for version in ("2", "1", "2"):
            assert server.deploy(ref(bundles, version))["champion"] == {"version": version, "runtime": "onnx"}
            marks = [len(v) for v in seen]
            # A request already past routing when the swap happened may still answer from the old set; the
            # second response after the reload was routed after it.
            wait_for(lambda marks=marks: all(len(v) >= m + 3 for v, m in zip(seen, marks, strict=True)), 60,
                     "every client to be answered after the reload")
            assert all(set(v[m + 1:]) == {version} for v, m in zip(seen, marks, strict=True)), \
                f"responses after the reload to {version} still came from another version"
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)

    assert failures == []
    assert {"1", "2"} <= {version for versions in seen for version in versions}


@pytest.mark.parametrize("broken", ["missing_folder", "always_failing_model"])
def test_a_reload_that_cannot_load_is_refused_and_the_old_model_keeps_serving(server, bundles, tmp_path, broken):
    server.deploy(ref(bundles, "1"))
    bundle = str(tmp_path / "no-such-bundle") if broken == "missing_folder" else str(bundles["always"])
    write_deployment(server.deployment, Deployment("penguins", ModelRef("9", bundle), None, utc_now()))

    response = server.http.post("/admin/reload", headers=AUTH)

    assert response.status_code == 409
    assert "champion version 9" in response.json()["detail"] and bundle in response.json()["detail"]
    assert server.http.get("/ready").json()["champion"] == {"version": "1", "runtime": "onnx"}
    answer = server.predict(records(1))
    assert answer.status_code == 200 and answer.json()["version"] == "1"


def test_a_canary_with_share_one_half_gets_part_of_the_traffic(server, bundles):
    body = server.deploy(ref(bundles, "1"), Canary("2", str(bundles["2"]), 0.5))
    assert body["canary"] == {"version": "2", "share": 0.5, "runtime": "onnx"}

    answers = [server.predict(records(1)).json() for _ in range(60)]

    assert {(a["variant"], a["version"]) for a in answers} == {("champion", "1"), ("canary", "2")}
    stats = server.stats()
    assert stats["champion"]["requests"] + stats["canary"]["requests"] == 60
    assert stats["canary"]["errors"] == 0 and stats["canary"]["p99_ms"] > 0
    canary_rows = [a for a in answers if a["variant"] == "canary"]
    assert_same_predictions(canary_rows[0]["predictions"], expected_predictions(bundles["2"], records(1)))


def test_a_canary_failing_at_inference_never_fails_a_user_request(server, bundles):
    server.deploy(ref(bundles, "1"), Canary("4", str(bundles["poison"]), 1.0))
    poison = [{**records(1)[0], "bill_length_mm": POISON_BILL_LENGTH}]
    before = metric_samples(server.http.get("/metrics").text)

    failed_on_canary = [server.predict(poison) for _ in range(5)]
    healthy = server.predict(records(1))

    for response in failed_on_canary:
        assert response.status_code == 200, response.text
        assert (response.json()["variant"], response.json()["version"]) == ("champion", "1")
    assert_same_predictions(failed_on_canary[0].json()["predictions"], expected_predictions(bundles["1"], poison))
    assert (healthy.json()["variant"], healthy.json()["version"]) == ("canary", "4")
    stats = server.stats()
    assert (stats["canary"]["requests"], stats["canary"]["errors"]) == (6, 5)
    assert (stats["champion"]["requests"], stats["champion"]["errors"]) == (5, 0)
    errors = metric_samples(server.http.get("/metrics").text)
    key = ("kiln_serve_model_errors_total", frozenset({"variant": "canary", "version": "4"}.items()))
    assert errors[key] - before.get(key, 0.0) == 5
    assert "canary version 4 failed (RuntimeError: the model failed on an input beyond its threshold)" \
        in server.log_tail()


def test_a_champion_failing_at_inference_answers_500_and_counts_the_error(server, bundles):
    server.deploy(ModelRef("5", str(bundles["poison"])))
    poison = [{**records(1)[0], "bill_length_mm": POISON_BILL_LENGTH}]

    failed = server.predict(poison)
    healthy = server.predict(records(1))

    assert failed.status_code == 500
    assert "the model failed" in failed.json()["detail"] and "beyond its threshold" in failed.json()["detail"]
    assert healthy.status_code == 200 and healthy.json()["version"] == "5"
    assert {k: server.stats()["champion"][k] for k in ("requests", "errors")} == {"requests": 2, "errors": 1}
    samples = metric_samples(server.http.get("/metrics").text)
    assert samples[("kiln_serve_requests_total", frozenset({"variant": "champion", "version": "5",
                                                            "status": "500"}.items()))] == 1


def test_a_reload_resets_the_statistics(server, bundles):
    server.deploy(ref(bundles, "1"))
    assert server.predict(records(1)).status_code == 200
    assert server.stats()["champion"]["requests"] == 1
    since = server.stats()["since"]

    server.deploy(ref(bundles, "1"))

    stats = server.stats()
    assert stats["champion"] == {"version": "1", "requests": 0, "errors": 0, "p50_ms": None, "p99_ms": None}
    assert stats["canary"] is None and stats["since"] >= since


def test_sighup_reloads_the_deployment_file(server, bundles):
    server.deploy(ref(bundles, "1"))
    write_deployment(server.deployment, Deployment("penguins", ref(bundles, "2"), None, utc_now()))

    server.proc.send_signal(signal.SIGHUP)

    wait_for(lambda: server.http.get("/ready").json()["champion"] == {"version": "2", "runtime": "onnx"}, 60,
             "the server to serve version 2 after SIGHUP")
    assert server.predict(records(1)).json()["version"] == "2"


@pytest.mark.parametrize("problem", ["missing_deployment", "missing_bundle"])
def test_a_server_that_cannot_load_its_deployment_exits_with_code_2(tmp_path, problem):
    deployment = tmp_path / "deployment.json"
    named = deployment
    if problem == "missing_bundle":
        named = tmp_path / "no-such-bundle"
        write_deployment(deployment, Deployment("penguins", ModelRef("1", str(named)), None, utc_now()))

    done = subprocess.run([sys.executable, "-m", "kiln.tasks.serving", "--deployment", str(deployment), "--port",
                           str(free_port())], cwd=REPO, env=server_env(), capture_output=True, text=True,
                          timeout=120)

    assert done.returncode == 2, done.stderr
    assert str(named) in done.stderr
