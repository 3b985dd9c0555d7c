"""Capture and feedback on a real model server: ``python -m kiln.tasks.serving`` on a loopback port, its artifact
store a local folder (``KILN_ARTIFACT_ROOT``), the Parquet files it publishes read back as the monitor reads them.

One server serves the module, flushing every half second or every 50 records so that flushes happen while
requests arrive; each test writes the capture share it needs and reloads. Each test looks only at the rows of the
request ids it received, so the tests do not depend on their order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving_fixtures import ServerProcess, bundle_factory, records, start_server_process  # noqa: F401

from kiln.tasks.serving.capture import RequestIds
from kiln.tasks.serving.deployment import CaptureSettings, Deployment, ModelRef, utc_now, write_deployment

pytestmark = pytest.mark.integration

TOKEN = "capture-test-kiln-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PIPELINE = "penguins"
INPUTS = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "island"]
#: How long a captured request may take to reach the store (the server flushes every 0.5 s).
FLUSH_WAIT_S = 20.0


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)
    return value


def read_files(root: Path, kind: str) -> pa.Table | None:
    """Every ``<kind>.parquet`` the server published under ``root`` (each one must be readable); a writer's staging
    folder (``.tmp-*``: a flush in progress) is not published, so it is not read, as the store's readers skip it."""
    pattern = ("_capture/version=*/hour=*/*/capture.parquet" if kind == "capture"
               else "_feedback/hour=*/*/feedback.parquet")
    tables = [pq.read_table(f) for f in sorted((root / PIPELINE).glob(pattern)) if not f.parent.name.startswith(".")]
    return pa.concat_tables(tables) if tables else None


def rows_of(root: Path, ids: set[str], kind: str = "capture") -> list[dict[str, Any]]:
    table = read_files(root, kind)
    return [] if table is None else [r for r in table.to_pylist() if r["request_id"] in ids]


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name} {labels} in /metrics")


def deploy(server: ServerProcess, deployment: Path, bundle: Path, share: float) -> None:
    write_deployment(deployment, Deployment(PIPELINE, ModelRef("1", str(bundle)), None, utc_now(),
                                            CaptureSettings(share)))
    response = httpx.post(f"{server.url}/admin/reload", headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text


def predict(server: ServerProcess, rows: list[dict[str, Any]], headers: dict[str, str] | None = None,
            client: httpx.Client | None = None) -> httpx.Response:
    post = client.post if client is not None else httpx.post
    return post(f"{server.url}/predict", json={"records": rows}, headers={**AUTH, **(headers or {})}, timeout=30)


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def served(bundle_factory, store_root, tmp_path_factory) -> Iterator[tuple[ServerProcess, Path, Path]]:  # noqa: F811
    folder = tmp_path_factory.mktemp("capture-server")
    deployment, bundle = folder / "deployment.json", bundle_factory(0)
    write_deployment(deployment, Deployment(PIPELINE, ModelRef("1", str(bundle)), None, utc_now(),
                                            CaptureSettings(1.0)))
    server = start_server_process(deployment, folder / "server.log", "--seed", "3", "--capture-flush-s", "0.5",
                                  "--capture-flush-rows", "50",
                                  env={"KILN_SERVE_TOKEN": TOKEN, "KILN_ARTIFACT_ROOT": str(store_root)})
    try:
        yield server, deployment, bundle
    finally:
        server.stop()


@pytest.fixture
def server(served) -> ServerProcess:
    return served[0]


@pytest.fixture
def share(served) -> Callable[[float], None]:
    server, deployment, bundle = served
    return lambda value: deploy(server, deployment, bundle, value)


def test_every_answer_carries_a_request_id_and_a_callers_own_is_kept(server, share):
    share(1.0)

    own = predict(server, records(1))
    theirs = predict(server, records(1), {"X-Request-Id": "order-17"})
    invalid = predict(server, [{"bill_length_mm": "long"}], {"X-Request-Id": "order-18"})
    replaced = predict(server, records(1), {"X-Request-Id": "not valid!"})

    assert own.status_code == 200 and len(own.headers["x-request-id"]) == 32
    assert theirs.status_code == 200 and theirs.headers["x-request-id"] == "order-17"
    assert invalid.status_code == 422 and invalid.headers["x-request-id"] == "order-18"
    assert replaced.status_code == 200 and len(replaced.headers["x-request-id"]) == 32


def test_at_share_one_every_record_is_captured_with_its_answer(server, share, store_root):
    share(1.0)
    sent: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    for seed in range(12):
        rows = records(3, seed=seed)
        response = predict(server, rows)
        assert response.status_code == 200, response.text
        sent[response.headers["x-request-id"]] = (rows, response.json()["predictions"])

    got = wait_for(lambda: (r := rows_of(store_root, set(sent))) and len(r) == 36 and r, FLUSH_WAIT_S,
                   "36 captured rows")

    table = read_files(store_root, "capture")
    assert table.column_names == ["request_id", "record", "received_at", "version", "variant", *INPUTS,
                                  "predicted_class", "predicted_value"]
    for row in got:
        rows, predictions = sent[row["request_id"]]
        record, answer = rows[row["record"]], predictions[row["record"]]
        assert {c: row[c] for c in INPUTS} == pytest.approx({c: record[c] for c in INPUTS})
        assert (row["version"], row["variant"], row["predicted_class"]) == ("1", "champion", answer["label"])
        assert row["predicted_value"] == pytest.approx(answer["probabilities"][answer["label"]], abs=1e-6)
        assert abs(row["received_at"].timestamp() - time.time()) < 120
    assert sorted((r["request_id"], r["record"]) for r in got) == sorted((i, k) for i in sent for k in range(3))


def test_at_share_half_about_half_is_captured_and_exactly_those_ids_verify(server, share, store_root):
    share(0.5)
    with httpx.Client(timeout=30) as http:
        ids = [predict(server, records(1, seed=i), client=http).headers["x-request-id"] for i in range(200)]
    verified = {i for i in ids if RequestIds(TOKEN).is_captured(i, 0.5)}

    wait_for(lambda: len(rows_of(store_root, set(ids))) == len(verified), FLUSH_WAIT_S,
             f"the {len(verified)} sampled requests in the store")

    assert 60 < len(verified) < 140
    assert {r["request_id"] for r in rows_of(store_root, set(ids))} == verified


def test_feedback_for_a_captured_request_is_stored_and_an_unknown_id_gets_404(server, share, store_root):
    share(1.0)
    request_id = predict(server, records(2)).headers["x-request-id"]
    share(0.0)
    not_captured = predict(server, records(1)).headers["x-request-id"]
    unknown_before = metric(server, "kiln_feedback_total", status="404")

    known = httpx.post(f"{server.url}/feedback", json={"request_id": request_id, "labels": ["Adelie", "Gentoo"]},
                       headers=AUTH, timeout=30)
    one = httpx.post(f"{server.url}/feedback", json={"request_id": request_id, "record": 1, "label": "Chinstrap"},
                     headers=AUTH, timeout=30)
    unknown = [httpx.post(f"{server.url}/feedback", json={"request_id": rid, "labels": ["Adelie"]}, headers=AUTH,
                          timeout=30) for rid in (not_captured, "never-seen-id")]
    anonymous = httpx.post(f"{server.url}/feedback", json={"request_id": request_id, "labels": ["Adelie"]},
                           timeout=30)

    assert (known.status_code, known.json()) == (200, {"request_id": request_id, "stored": 2})
    assert one.status_code == 200, one.text
    assert [r.status_code for r in unknown] == [404, 404]
    assert "unknown request id" in unknown[0].json()["detail"]
    assert anonymous.status_code == 401
    assert metric(server, "kiln_feedback_total", status="404") == unknown_before + 2
    stored = wait_for(lambda: (r := rows_of(store_root, {request_id}, "feedback")) and len(r) == 3 and r,
                      FLUSH_WAIT_S, "3 feedback rows")
    assert sorted((r["record"], r["label"]) for r in stored) == [(0, "Adelie"), (1, "Chinstrap"), (1, "Gentoo")]


def test_a_burst_of_concurrent_requests_while_flushing_fails_none(server, share, store_root):
    share(1.0)
    flushes_before = metric(server, "kiln_capture_flushes_total", status="ok")
    statuses: list[int] = []
    ids: list[str] = []
    lock = threading.Lock()

    def client(worker: int) -> None:
        with httpx.Client(timeout=30) as http:
            for i in range(40):
                response = predict(server, records(2, seed=worker * 100 + i), client=http)
                with lock:
                    statuses.append(response.status_code)
                    ids.append(response.headers.get("x-request-id", ""))

    threads = [threading.Thread(target=client, args=(w,)) for w in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert statuses == [200] * 640
    wait_for(lambda: len(rows_of(store_root, set(ids))) == 1280, FLUSH_WAIT_S, "the burst's 1280 records")
    assert metric(server, "kiln_capture_flushes_total", status="ok") - flushes_before > 2
    assert metric(server, "kiln_capture_flushes_total", status="failed") == 0
    assert metric(server, "kiln_capture_dropped_total", reason="full") == 0
    wait_for(lambda: metric(server, "kiln_capture_buffered_records") == 0, FLUSH_WAIT_S, "an empty buffer")
    assert metric(server, "kiln_capture_oldest_age_seconds") == 0


def test_a_stopping_server_writes_what_it_holds_and_a_restart_knows_its_ids(bundle_factory, served, tmp_path):  # noqa: F811
    root = tmp_path / "artifacts"
    deployment = tmp_path / "deployment.json"
    write_deployment(deployment, Deployment(PIPELINE, ModelRef("1", str(bundle_factory(0))), None, utc_now(),
                                            CaptureSettings(1.0)))
    env = {"KILN_SERVE_TOKEN": TOKEN, "KILN_ARTIFACT_ROOT": str(root)}
    first = start_server_process(deployment, tmp_path / "first.log", "--capture-flush-s", "3600", env=env)
    try:
        ids = {predict(first, records(1, seed=i)).headers["x-request-id"] for i in range(5)}
        assert read_files(root, "capture") is None  # nothing written before the stop: an hour between flushes
    finally:
        first.stop()
    assert len(rows_of(root, ids)) == 5

    # Another process with the same kiln token (a restart, or a replica) takes feedback for those ids.
    replica = served[0]
    response = httpx.post(f"{replica.url}/feedback", json={"request_id": next(iter(ids)), "labels": ["Gentoo"]},
                          headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
