"""Replicas as containers of the serve image (``replicas.image``) behind the fleet's HAProxy, on a real engine: they
serve, a dead one is replaced, and none outlives the fleet, even one killed with SIGKILL.

Needs a Docker engine and the test images: ``make docker-engine image`` (``make test`` runs both first).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import docker
import httpx
import pytest
from conftest import free_port
from docker_engine import ready_engine
from serving_fixtures import bundle_factory, records, wait_until  # noqa: F401 - the session fixture

from kiln.tasks.launch.containers import JOB_LABEL
from kiln.tasks.serving.client import ServingClient
from kiln.tasks.serving.deployment import Deployment, ModelRef, write_deployment
from kiln.tasks.serving.process import ensure_server, stop_server
from kiln.tasks.serving.scaling import ReplicaSettings

pytestmark = [pytest.mark.docker, pytest.mark.integration]

IMAGE = "kiln-serve:cpu"
TOKEN = "replica-container-token"
MODEL = "contained"


def granted_to(pid: int) -> list[str]:
    """The leases granted to the fleet ``pid``."""
    from kiln.tasks.pools.store import LeaseStore

    with LeaseStore.from_settings() as store:
        return [lease.id for lease in store.leases("local") if lease.state == "granted" and lease.owner.pid == pid]


@pytest.fixture(scope="module")
def engine() -> Iterator[docker.DockerClient]:
    client = ready_engine()
    yield client
    client.close()


def test_container_replicas_serve_are_replaced_and_die_with_the_fleet(engine, bundle_factory, tmp_path,  # noqa: F811
                                                                       monkeypatch):
    monkeypatch.setenv("KILN_SERVE_TOKEN", TOKEN)
    run_dir, port = tmp_path / "serving", free_port()
    run_dir.mkdir()
    deployment = Deployment(MODEL, ModelRef("1", str(bundle_factory(seed=0))),
                            replicas=ReplicaSettings(min=1, max=1, image=IMAGE))
    write_deployment(run_dir / "deployment.json", deployment)
    handle = ensure_server(run_dir / "deployment.json", host="127.0.0.1", port=port, token=TOKEN, run_dir=run_dir,
                           start_timeout_s=120)
    job = {"label": f"{JOB_LABEL}=serve-{MODEL}-{handle.pid}"}
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def fleet() -> dict[str, Any]:
        return httpx.get(f"{handle.url}/admin/fleet", headers=auth, timeout=5).json()

    try:
        with ServingClient(handle.url, TOKEN) as client:
            assert client.predict(records(2))["version"] == "1"
        first = fleet()["replicas"][0]
        assert first["container"] and first["state"] == "ready"
        [container] = engine.containers.list(filters=job)
        assert container.attrs["HostConfig"]["CpusetCpus"] == ",".join(map(str, first["cpus"]))
        assert container.attrs["HostConfig"]["ReadonlyRootfs"] and container.attrs["Config"]["User"] != "0:0"

        container.kill()  # the replica dies: out of rotation, and a new container takes its slot
        wait_until("a new container in rotation", lambda: [r for r in fleet()["replicas"]
                                                   if r["state"] == "ready" and r["pid"] != first["pid"]], 60)
        with ServingClient(handle.url, TOKEN) as client:
            assert client.predict(records(1))["version"] == "1"

        os.kill(handle.pid, signal.SIGKILL)  # the fleet dies without any cleanup of its own
        wait_until("the fleet's containers removed by its watchdog", lambda: not engine.containers.list(all=True,
                                                                                                  filters=job), 30)
        assert granted_to(handle.pid)  # its lease outlives it, until its TTL ...
        again = ensure_server(run_dir / "deployment.json", host="127.0.0.1", port=port, token=TOKEN,
                              run_dir=run_dir, start_timeout_s=120)
        assert again.pid != handle.pid and not granted_to(handle.pid)  # ... or the next fleet of the model
        assert granted_to(again.pid)
    finally:
        stop_server(run_dir)
        for leftover in engine.containers.list(all=True, filters=job):
            leftover.remove(force=True)
