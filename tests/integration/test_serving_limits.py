"""The model server's input limits, met as a hostile client meets them: raw sockets against a real
``python -m kiln.tasks.serving`` process on a loopback port.

Bodies over the size limit are refused with 413 before they are read; requests whose headers or body do not arrive
within their time limit get 408; idle connections are closed, and a crowd of idle connections beyond the
descriptor limit does not keep ``/health`` from answering; numbers the model cannot hold get 422 naming the field.
"""

from __future__ import annotations

import json
import os
import re
import resource
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serving_fixtures import ServerProcess, bundle_factory, records, start_server_process  # noqa: F401

from kiln.tasks.serving.deployment import Deployment, ModelRef, utc_now, write_deployment

pytestmark = pytest.mark.integration

TOKEN = "limits-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Short time limits, so that the tests of the time limits take seconds (the defaults are ServerLimits()'s).
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 3.0
IDLE_TIMEOUT_S = 2.0
#: Slack on top of a time limit for the answer to arrive on a busy 2-core machine.
SLACK_S = 5.0
#: The default body limit (``ServerLimits.max_body_bytes``).
DEFAULT_MAX_BODY = 8 * 1024 * 1024
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def deployment(bundle_factory, tmp_path_factory) -> Path:  # noqa: F811
    path = tmp_path_factory.mktemp("limits") / "deployment.json"
    write_deployment(path, Deployment("penguins", ModelRef("1", str(bundle_factory(0))), None, utc_now()))
    return path


@pytest.fixture(scope="module")
def server(deployment, tmp_path_factory) -> Iterator[ServerProcess]:
    """A server with the default limits."""
    proc = start_server_process(deployment, tmp_path_factory.mktemp("limits-log") / "server.log",
                                env={"KILN_SERVE_TOKEN": TOKEN})
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def timed_server(deployment, tmp_path_factory) -> Iterator[ServerProcess]:
    """A server with short time limits."""
    proc = start_server_process(deployment, tmp_path_factory.mktemp("timed-log") / "server.log",
                                "--header-timeout-s", str(HEADER_TIMEOUT_S), "--body-timeout-s", str(BODY_TIMEOUT_S),
                                "--idle-timeout-s", str(IDLE_TIMEOUT_S), env={"KILN_SERVE_TOKEN": TOKEN})
    try:
        yield proc
    finally:
        proc.stop()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setblocking(True)
    return sock


def read_response(sock: socket.socket, timeout: float) -> tuple[int | None, bytes]:
    """``(status, body)`` of the response on ``sock``; ``(None, b"")`` if the server closed without one. Fails the
    test if neither happens within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no response and no close within {timeout} s (received {data[:200]!r})")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        except TimeoutError:
            continue
        if not chunk:
            break
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        if sep and length and len(body) >= int(length.group(1)):
            break
    if not data:
        return None, b""
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def predict_head(length: int | None, token: str = TOKEN) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST /predict HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\n{framing}\r\n\r\n").encode()


def health_within(url: str, timeout: float) -> float:
    """Seconds ``GET /health`` took on a new connection; fails the test beyond ``timeout``."""
    start = time.monotonic()
    try:
        response = httpx.get(f"{url}/health", timeout=timeout)
    except httpx.HTTPError as exc:
        pytest.fail(f"/health did not answer within {timeout} s: {exc!r}")
    assert response.status_code == 200
    return time.monotonic() - start


def test_a_body_declared_over_the_limit_gets_413_without_being_sent(server):
    with connect(server.port) as sock:
        sock.sendall(predict_head(100 * MIB) + b'{"records": [')  # the other 100 MB never come

        status, body = read_response(sock, timeout=SLACK_S)

    assert status == 413
    detail = json.loads(body)["detail"]
    assert str(DEFAULT_MAX_BODY) in detail and "--max-body-bytes" in detail


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit(server):
    chunk = b" " * (64 * 1024)
    sent = 0
    with connect(server.port) as sock:
        sock.sendall(predict_head(None))
        status = None
        while sent < 100 * MIB:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
            if select.select([sock], [], [], 0)[0]:
                break
        status, body = read_response(sock, timeout=SLACK_S)

    assert status == 413, body
    # What the server read before refusing, plus what the socket buffers of both ends held.
    assert sent < DEFAULT_MAX_BODY + 32 * MIB, f"the client could send {sent / MIB:.0f} MiB"


def test_a_body_just_under_the_limit_is_served(server):
    body = json.dumps({"records": records(2)}).encode()
    padded = body[:-1] + b" " * (DEFAULT_MAX_BODY - len(body) - 16) + b"}"

    response = httpx.post(f"{server.url}/predict", content=padded, headers={**AUTH, "Content-Type": "application/json"},
                          timeout=30)

    assert response.status_code == 200, response.text


def _half_headers(sock: socket.socket) -> None:
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\nAuthoriz")


def _half_body(sock: socket.socket) -> None:
    sock.sendall(predict_head(1000) + b'{"records": [')


@pytest.mark.parametrize(("send", "limit_s"), [(_half_headers, HEADER_TIMEOUT_S), (_half_body, BODY_TIMEOUT_S)],
                         ids=["half_sent_headers", "half_sent_body"])
def test_half_sent_requests_get_408_within_the_time_limit(timed_server, send, limit_s):
    server = timed_server
    count = 300
    socks = [connect(server.port) for _ in range(count)]
    try:
        for sock in socks:
            send(sock)
        start = time.monotonic()
        assert health_within(server.url, timeout=SLACK_S) < SLACK_S
        outcomes = [read_response(sock, timeout=limit_s + SLACK_S - (time.monotonic() - start))[0] for sock in socks]
    finally:
        for sock in socks:
            sock.close()

    assert set(outcomes) == {408}, f"outcomes: { {o: outcomes.count(o) for o in set(outcomes)} }"


def test_headers_trickled_a_byte_at_a_time_are_cut_off_at_the_header_limit(timed_server):
    server = timed_server
    request = b"GET /health HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"a" * 100
    with connect(server.port) as sock:
        start = time.monotonic()
        status = None
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            if select.select([sock], [], [], 0.1)[0]:
                break
        status, _ = read_response(sock, timeout=SLACK_S)
        took = time.monotonic() - start

    assert status == 408
    assert took < HEADER_TIMEOUT_S + SLACK_S


def test_a_connection_that_sends_nothing_is_closed_after_the_idle_limit(timed_server):
    server = timed_server
    with connect(server.port) as sock:
        start = time.monotonic()
        status, _ = read_response(sock, timeout=IDLE_TIMEOUT_S + SLACK_S)

    assert status is None  # closed without a response: there was no request to answer
    assert time.monotonic() - start >= IDLE_TIMEOUT_S * 0.9


def test_health_answers_under_1100_idle_connections_with_1024_descriptors(deployment, tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 1100 + 200
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"this test process may open only {hard} descriptors; it needs {needed}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    server = start_server_process(deployment, tmp_path / "server.log", env={"KILN_SERVE_TOKEN": TOKEN}, nofile=1024)
    socks: list[socket.socket] = []
    try:
        for _ in range(1100):
            socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))

        took = health_within(server.url, timeout=3.0)
        predicted = httpx.post(f"{server.url}/predict", json={"records": records(1)}, headers=AUTH, timeout=3.0)
        descriptors = len(os.listdir(f"/proc/{server.proc.pid}/fd"))
    finally:
        for sock in socks:
            sock.close()
        code = server.stop()

    assert took < 3.0
    assert predicted.status_code == 200
    assert descriptors <= 1024
    assert code in (0, -15)
    assert "Too many open files" not in server.log_text()


def test_slow_requests_beyond_the_connection_cap_never_keep_health_out(deployment, tmp_path):
    cap = 100
    server = start_server_process(deployment, tmp_path / "server.log", "--max-connections", str(cap),
                                  "--header-timeout-s", str(HEADER_TIMEOUT_S), "--body-timeout-s", str(BODY_TIMEOUT_S),
                                  env={"KILN_SERVE_TOKEN": TOKEN})
    socks = [connect(server.port) for _ in range(150)]
    try:
        for i, sock in enumerate(socks):
            (_half_headers if i % 2 else _half_body)(sock)
        start = time.monotonic()

        took = health_within(server.url, timeout=3.0)
        outcomes = [read_response(sock, timeout=BODY_TIMEOUT_S + SLACK_S - (time.monotonic() - start))[0]
                    for sock in socks]
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    finally:
        for sock in socks:
            sock.close()
        code = server.stop()

    assert took < 3.0
    assert set(outcomes) <= {408, 503, None}  # answered or closed, none held past its limit
    assert 'kiln_serve_connections_ended_by_limit_total{reason="408"}' in metrics
    assert code in (0, -15) and "Traceback" not in server.log_text()


def test_bodies_in_flight_together_are_bounded_and_the_budget_comes_back(deployment, tmp_path):
    body_limit, budget = 4 * MIB, 10 * MIB
    server = start_server_process(deployment, tmp_path / "server.log", "--max-body-bytes", str(body_limit),
                                  "--max-pending-body-bytes", str(budget), env={"KILN_SERVE_TOKEN": TOKEN})
    try:
        holding = [connect(server.port) for _ in range(2)]
        for sock in holding:
            sock.sendall(predict_head(body_limit) + b'{"records": [')  # 8 MiB of the 10 promised, never sent
        time.sleep(0.5)
        with connect(server.port) as third:
            third.sendall(predict_head(body_limit) + b'{"records": [')
            status, detail = read_response(third, timeout=SLACK_S)
        small = httpx.post(f"{server.url}/predict", json={"records": records(1)}, headers=AUTH, timeout=30)
        for sock in holding:
            sock.close()
        time.sleep(0.5)
        body = json.dumps({"records": records(1)}).encode()
        big = body[:-1] + b" " * (body_limit - len(body) - 16) + b"}"
        after = httpx.post(f"{server.url}/predict", content=big, headers={**AUTH, "Content-Type": "application/json"},
                           timeout=30)
    finally:
        server.stop()

    assert status == 503 and "--max-pending-body-bytes" in json.loads(detail)["detail"]
    assert small.status_code == 200, small.text
    assert after.status_code == 200, after.text


FIELD = "bill_length_mm"


def _with(value: str, index: int = 0, n: int = 1) -> bytes:
    """A predict body of ``n`` records whose record ``index`` holds ``value`` (JSON text) in the float field."""
    rows = records(n)
    rows[index][FIELD] = "__VALUE__"
    return json.dumps({"records": rows}).replace('"__VALUE__"', value).encode()


@pytest.mark.parametrize(("value", "index", "n"), [
    ("1e308", 0, 1),
    ("-1e308", 0, 1),
    ("1e40", 0, 1),
    ("1" + "0" * 40, 0, 1),
    ("NaN", 0, 1),
    ("Infinity", 0, 1),
    ("-Infinity", 0, 1),
    ("1e400", 0, 1),
    ("1e308", 37, 512),
], ids=["1e308", "minus_1e308", "1e40", "int_1e40", "NaN", "Infinity", "minus_Infinity", "1e400",
        "one_bad_record_of_512"])
def test_numbers_the_model_cannot_hold_get_422_naming_the_field(server, value, index, n):
    response = httpx.post(f"{server.url}/predict", content=_with(value, index, n),
                          headers={**AUTH, "Content-Type": "application/json"}, timeout=30)

    assert response.status_code == 422, response.text
    fields = [e["field"] for e in response.json()["detail"]]
    assert fields == [f"records[{index}].{FIELD}"], response.text


def test_large_but_representable_numbers_are_served(server):
    response = httpx.post(f"{server.url}/predict", content=_with("1e30"),
                          headers={**AUTH, "Content-Type": "application/json"}, timeout=30)

    assert response.status_code == 200, response.text
