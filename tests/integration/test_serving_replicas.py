"""A model served by replicas behind HAProxy (the fleet), under real load from wrk.

Every process is real: Debian's HAProxy, the kiln model servers, wrk (``make test`` installs both), the lease store
of the resource pools. Each test runs wrk in the background and asserts what a client saw: how many requests
failed, and what the fleet did meanwhile (``GET /admin/fleet`` through the balancer).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO, free_port
from serving_fixtures import bundle_factory, records, wait_until  # noqa: F401 - the session fixture

from kiln.tasks.fleet.haproxy import CHECK_INTERVAL_MS, RuntimeAPI
from kiln.tasks.processes import alive
from kiln.tasks.serving.client import ServingClient
from kiln.tasks.serving.deployment import (
    Deployment,
    ModelRef,
    drop_canary,
    promote_canary,
    read_deployment,
    with_canary,
    with_champion,
    write_deployment,
)
from kiln.tasks.serving.process import ensure_server, stop_server
from kiln.tasks.serving.scaling import ReplicaSettings

TOKEN = "replica-test-token"
MODEL = "replicated"


class Endpoint:
    """A fleet started with :func:`ensure_server` on a port of its own."""

    def __init__(self, run_dir: Path, port: int):
        self.run_dir, self.port = run_dir, port
        self.url = f"http://127.0.0.1:{port}"
        self.deployment = run_dir / "deployment.json"

    def serve(self, deployment: Deployment) -> None:
        write_deployment(self.deployment, deployment)
        ensure_server(self.deployment, host="127.0.0.1", port=self.port, token=TOKEN, run_dir=self.run_dir)

    def fleet(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/admin/fleet", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
        response.raise_for_status()
        return response.json()

    def ready(self) -> list[dict[str, Any]]:
        return [r for r in self.fleet()["replicas"] if r["state"] == "ready"]

    def wait(self, what: str, check: Callable[[], Any], timeout_s: float) -> Any:
        return wait_until(what, check, timeout_s, lambda: f"; fleet: {json.dumps(self.fleet())}")


class Load:
    """wrk posting one record per request through the balancer, in the background."""

    def __init__(self, endpoint: Endpoint, body: Path, clients: int, duration_s: int):
        cmd = ["wrk", "-t1", f"-c{clients}", f"-d{duration_s}s", "--timeout", "10s", "-s",
               str(REPO / "bench" / "wrk_post.lua"), f"{endpoint.url}/predict", "--", str(body), TOKEN]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.duration_s = duration_s

    def result(self) -> dict[str, Any]:
        """wrk's summary: requests, and the errors by kind (connect, read, write, status, timeout)."""
        out, err = self.proc.communicate(timeout=self.duration_s + 60)
        assert self.proc.returncode == 0, f"wrk failed: {err[-2000:]}"
        return json.loads(out.strip().splitlines()[-1])


def failed(result: dict[str, Any]) -> int:
    return sum(result["errors"].values())


@pytest.fixture(scope="module")
def bundles(bundle_factory) -> dict[str, Path]:  # noqa: F811
    return {"1": bundle_factory(seed=0), "2": bundle_factory(seed=1)}


@pytest.fixture
def endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Endpoint]:
    monkeypatch.setenv("KILN_SERVE_TOKEN", TOKEN)
    ep = Endpoint(tmp_path / "serving", free_port())
    ep.run_dir.mkdir()
    try:
        yield ep
    finally:
        stop_server(ep.run_dir)


@pytest.fixture
def body(tmp_path: Path) -> Path:
    path = tmp_path / "body.json"
    path.write_text(json.dumps({"records": records(1)}))
    return path


def test_scales_out_under_load_and_back_when_idle_without_a_failed_request(endpoint, bundles, body):
    settings = ReplicaSettings(min=1, max=2, target_in_flight=2, scale_up_s=1, scale_down_s=3, drain_timeout_s=10)
    endpoint.serve(Deployment(MODEL, ModelRef("1", str(bundles["1"])), replicas=settings))
    assert len(endpoint.ready()) == 1

    heavy = Load(endpoint, body, clients=16, duration_s=10)
    two = endpoint.wait("a scale-out to 2 ready replicas", lambda: len(endpoint.ready()) == 2, timeout_s=9)
    assert two
    result = heavy.result()
    assert result["requests"] > 500
    assert failed(result) == 0, result

    # A light load (below one replica's target) runs on while the second replica is drained and stopped.
    light = Load(endpoint, body, clients=1, duration_s=8)
    endpoint.wait("a scale-in to 1 replica", lambda: len(endpoint.fleet()["replicas"]) == 1, timeout_s=8)
    result = light.result()
    assert failed(result) == 0, result
    events = [e["event"] for e in endpoint.fleet()["events"]]
    assert "draining" in events and "stopped" in events, events
    stopped = next(e for e in endpoint.fleet()["events"] if e["event"] == "stopped")
    assert stopped["detail"] == "drained"


def test_a_killed_replica_costs_at_most_its_requests_in_flight_and_is_replaced(endpoint, bundles, body):
    settings = ReplicaSettings(min=2, max=2)
    endpoint.serve(Deployment(MODEL, ModelRef("1", str(bundles["1"])), replicas=settings))
    endpoint.wait("2 ready replicas", lambda: len(endpoint.ready()) == 2, timeout_s=30)
    api = RuntimeAPI(endpoint.run_dir / "haproxy.sock")

    load = Load(endpoint, body, clients=16, duration_s=8)
    time.sleep(2)
    victim = endpoint.ready()[0]
    in_flight = api.stats()[f"r{victim['slot']}"].in_flight
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    endpoint.wait("the dead replica out of rotation",
                  lambda: api.stats()[f"r{victim['slot']}"].status not in ("UP", "DRAIN"), timeout_s=5)
    out_after = time.monotonic() - killed_at
    result = load.result()

    # At most the requests it held when it died fail; HAProxy retries the ones it can on the other replica.
    print(f"\nkill -9 under load: {failed(result)} of {result['requests']} requests failed, {in_flight} were in "
          f"flight on the killed replica; out of rotation after {out_after:.2f} s")
    assert failed(result) <= in_flight, (result, in_flight)
    assert out_after <= CHECK_INTERVAL_MS / 1000 * 2, out_after
    replaced = endpoint.wait("a replacement in the dead one's slot",
                             lambda: next((r for r in endpoint.ready()
                                           if r["slot"] == victim["slot"] and r["pid"] != victim["pid"]), None),
                             timeout_s=30)
    fleet = endpoint.fleet()
    assert fleet["restarts"] == 1 and replaced["cpus"], fleet
    assert any(e["event"] == "died" and e["pid"] == victim["pid"] for e in fleet["events"])


def served_versions(endpoint: Endpoint, n: int = 60) -> dict[str, int]:
    with ServingClient(endpoint.url, TOKEN) as client:
        return dict(Counter(client.predict(records(1))["version"] for _ in range(n)))


def test_a_rolling_update_fails_no_request(endpoint, bundles, body):
    endpoint.serve(Deployment(MODEL, ModelRef("1", str(bundles["1"])), replicas=ReplicaSettings(min=2, max=2)))
    endpoint.wait("2 ready replicas", lambda: len(endpoint.ready()) == 2, timeout_s=30)
    pids = {r["pid"] for r in endpoint.ready()}

    load = Load(endpoint, body, clients=8, duration_s=6)
    time.sleep(1)
    endpoint.serve(with_champion(read_deployment(endpoint.deployment), ModelRef("2", str(bundles["2"]))))
    assert set(served_versions(endpoint)) == {"2"}
    result = load.result()
    assert failed(result) == 0, result
    fleet = endpoint.fleet()
    assert fleet["champion"] == "2" and {r["pid"] for r in fleet["replicas"]} == pids  # reloaded in place


def test_a_canary_is_a_replica_weighted_at_its_share_and_a_rollback_drains_it(endpoint, bundles, body):
    endpoint.serve(Deployment(MODEL, ModelRef("1", str(bundles["1"])), replicas=ReplicaSettings(min=1, max=1)))
    endpoint.serve(with_canary(read_deployment(endpoint.deployment), ModelRef("2", str(bundles["2"])), 0.25))
    canary = endpoint.wait("the canary's replica in rotation",
                           lambda: next((r for r in endpoint.ready() if r["role"] == "canary"), None), timeout_s=30)
    champion = next(r for r in endpoint.ready() if r["role"] == "champion")
    assert canary["weight"] / (canary["weight"] + champion["weight"]) == pytest.approx(0.25, abs=0.01)
    # One request at a time (a quiet endpoint): the weights alone decide, so the share is exact.
    seen = served_versions(endpoint, 200)
    assert seen.get("2", 0) / 200 == pytest.approx(0.25, abs=0.03), seen

    load = Load(endpoint, body, clients=8, duration_s=8)
    time.sleep(1)
    seen = served_versions(endpoint, 200)  # among wrk's requests: the share holds within sampling noise
    assert 0.15 < seen.get("2", 0) / 200 < 0.35, seen

    endpoint.serve(drop_canary(read_deployment(endpoint.deployment)))  # the rollback
    assert set(served_versions(endpoint)) == {"1"}  # the weight moved back at once
    endpoint.wait("the canary's replica stopped", lambda: len(endpoint.fleet()["replicas"]) == 1, timeout_s=15)
    result = load.result()
    assert failed(result) == 0, result
    stopped = [e for e in endpoint.fleet()["events"] if e["event"] == "stopped"]
    assert [(e["role"], e["detail"]) for e in stopped] == [("canary", "drained")]


def test_a_promoted_canary_rolls_onto_the_champion_replicas(endpoint, bundles):
    first = Deployment(MODEL, ModelRef("1", str(bundles["1"])), replicas=ReplicaSettings(min=1, max=1))
    endpoint.serve(with_canary(first, ModelRef("2", str(bundles["2"])), 0.5))
    endpoint.wait("the canary's replica in rotation", lambda: len(endpoint.ready()) == 2, timeout_s=30)
    endpoint.serve(promote_canary(read_deployment(endpoint.deployment)))
    assert set(served_versions(endpoint)) == {"2"}
    endpoint.wait("the canary's replica stopped", lambda: len(endpoint.fleet()["replicas"]) == 1, timeout_s=15)
    assert endpoint.fleet()["replicas"][0]["role"] == "champion"


def test_a_raised_max_adds_slots_to_the_running_balancer(endpoint, bundles, body):
    """The balancer starts with max + 1 slots; a deployment asking for more gets them at run time (``add server``),
    with the same HAProxy and no failed request."""
    first = Deployment(MODEL, ModelRef("1", str(bundles["1"])), replicas=ReplicaSettings(min=1, max=1))
    endpoint.serve(first)
    balancer = endpoint.fleet()["balancer_pid"]
    load = Load(endpoint, body, clients=4, duration_s=6)
    time.sleep(1)
    endpoint.serve(replace(first, replicas=ReplicaSettings(min=2, max=2)))
    ready = endpoint.wait("2 ready replicas", lambda: len(endpoint.ready()) == 2, timeout_s=30)
    assert ready and endpoint.fleet()["balancer_pid"] == balancer
    slots = RuntimeAPI(endpoint.run_dir / "haproxy.sock").stats()
    assert {"r1", "r2", "r3"} <= set(slots), slots  # 2 replicas and a canary's
    result = load.result()
    assert failed(result) == 0, result


def test_a_deployment_that_cannot_load_ends_the_start_with_its_reason(endpoint, tmp_path):
    broken = tmp_path / "not-a-bundle"
    broken.mkdir()
    write_deployment(endpoint.deployment, Deployment(MODEL, ModelRef("1", str(broken)), replicas=ReplicaSettings()))
    from kiln.tasks.serving.process import ServerStartError

    started = time.monotonic()
    with pytest.raises(ServerStartError, match="lacks bundle.json"):
        ensure_server(endpoint.deployment, host="127.0.0.1", port=endpoint.port, token=TOKEN,
                      run_dir=endpoint.run_dir)
    assert time.monotonic() - started < 30  # not the whole start timeout
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{endpoint.url}/health", timeout=2)  # no balancer left behind


def test_more_replicas_than_the_pool_holds_are_refused_before_anything_changes(endpoint, bundles):
    from kiln.tasks.pipeline.endpoint import Endpoint as PipelineEndpoint

    served = PipelineEndpoint(MODEL, "127.0.0.1", endpoint.port, endpoint.run_dir)
    served.serve(Deployment(MODEL, ModelRef("1", str(bundles["1"])), replicas=ReplicaSettings(min=1, max=1)))
    before = endpoint.deployment.read_bytes()
    cores = os.cpu_count() or 1
    too_many = replace(read_deployment(endpoint.deployment),
                       replicas=ReplicaSettings(min=1, max=min(cores + 1, 32)))
    with pytest.raises(ValueError, match=r"replicas\.max is .* holds at most"):
        served.serve(too_many)
    assert endpoint.deployment.read_bytes() == before
    assert len(endpoint.ready()) == 1


def test_a_dead_balancer_ends_the_fleet_and_its_replicas(endpoint, bundles):
    endpoint.serve(Deployment(MODEL, ModelRef("1", str(bundles["1"])), replicas=ReplicaSettings(min=1, max=1)))
    fleet = endpoint.fleet()
    fleet_pid = int((endpoint.run_dir / "server.pid").read_text())
    os.kill(fleet["balancer_pid"], signal.SIGKILL)
    # The fleet ends (the watchdog of `kiln up` starts it anew), and its replicas die with it.
    wait_until("the fleet's exit", lambda: not alive(fleet_pid), 10)
    wait_until("its replica's exit", lambda: not alive(fleet["replicas"][0]["pid"]), 10)
    assert "HAProxy exited" in (endpoint.run_dir / "server.log").read_text()
