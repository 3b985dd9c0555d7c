"""The serving image ``kiln-serve:cpu`` on a real engine: a container serves a bundle mounted read-only, with the
token passed through its environment, on a port published on loopback only.

Needs a Docker engine and the test images: ``make docker-engine image`` (``make test`` runs both first).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import docker
import httpx
import pytest
from docker_engine import ready_engine
from serving_fixtures import bundle_factory, records  # noqa: F401

from kiln.tasks.bundle.load import load_bundle
from kiln.tasks.serving.deployment import Deployment, ModelRef, utc_now, write_deployment

pytestmark = [pytest.mark.docker, pytest.mark.integration]

IMAGE = "kiln-serve:cpu"
TOKEN = "docker-test-token"
PORT = 8765
START_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def engine() -> docker.DockerClient:
    client = ready_engine()
    yield client
    client.close()


def readable_copy(src: Path, dst: Path) -> Path:
    """A copy the container's user (uid 1000) can read whatever this machine's umask is."""
    shutil.copytree(src, dst)
    for path in [dst, *dst.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dst


def test_the_serving_container_answers_with_the_mounted_bundle(engine, bundle_factory, tmp_path):  # noqa: F811
    bundle = readable_copy(bundle_factory(0), tmp_path / "bundle")
    deploy = tmp_path / "deploy"
    deploy.mkdir(mode=0o755)
    # Paths in the deployment file are the container's.
    write_deployment(deploy / "deployment.json", Deployment("penguins", ModelRef("1", "/bundles/v1"), None,
                                                            utc_now())).chmod(0o644)
    container = None
    try:
        container = engine.containers.run(
            IMAGE, ["--deployment", "/deploy/deployment.json"], detach=True,
            environment={"KILN_SERVE_TOKEN": TOKEN}, ports={f"{PORT}/tcp": ("127.0.0.1", None)},
            volumes={str(bundle): {"bind": "/bundles/v1", "mode": "ro"},
                     str(deploy): {"bind": "/deploy", "mode": "ro"}},
            labels={"kiln.test": "serve-docker"})
        container.reload()
        url = f"http://127.0.0.1:{container.ports[f'{PORT}/tcp'][0]['HostPort']}"
        assert container.attrs["Config"]["User"] == "1000:0"

        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            container.reload()
            assert container.status == "running", \
                f"the container stopped ({container.status}):\n{container.logs().decode()[-3000:]}"
            try:
                ready = httpx.get(f"{url}/ready", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, \
                f"not ready within {START_TIMEOUT_S} s:\n{container.logs().decode()[-3000:]}"
            time.sleep(0.2)
        assert ready.json() == {"model": "penguins", "champion": {"version": "1", "runtime": "onnx"}, "canary": None}

        rows = records(4)
        refused = httpx.post(f"{url}/predict", json={"records": rows}, timeout=30)
        answered = httpx.post(f"{url}/predict", json={"records": rows}, timeout=30,
                              headers={"Authorization": f"Bearer {TOKEN}"})

        assert refused.status_code == 401
        assert answered.status_code == 200, answered.text
        body = answered.json()
        assert (body["version"], body["variant"]) == ("1", "champion")
        loaded = load_bundle(bundle)
        want = loaded.format_predictions(loaded.predict_records(rows))
        assert [p["label"] for p in body["predictions"]] == [p["label"] for p in want]
        for got, expected in zip(body["predictions"], want, strict=True):
            assert got["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
        assert TOKEN not in container.logs().decode()

        # The image's HEALTHCHECK probes /health inside the container (first probe after its 10 s interval).
        deadline = time.monotonic() + 60
        while (health := container.attrs["State"].get("Health", {}).get("Status")) != "healthy":
            assert health in ("starting", None), f"the container is {health}: {container.attrs['State']}"
            assert time.monotonic() < deadline, "the container was not healthy within 60 s"
            time.sleep(0.5)
            container.reload()
    finally:
        if container is not None:
            container.remove(force=True)
