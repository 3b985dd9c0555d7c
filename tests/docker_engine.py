"""The Docker tests' precondition: an engine that answers and a test image built from the current sources."""

from __future__ import annotations

import subprocess
from pathlib import Path

import docker
import pytest

REPO = Path(__file__).resolve().parents[1]


def ready_engine() -> docker.DockerClient:
    """A client of the local engine, with ``kiln-train:cpu`` and ``kiln-serve:cpu`` current; fails (never skips)
    the test without them.

    The containers must run the code under test, so the images' code layers are rebuilt if ``tasks/`` changed
    since ``make image`` (seconds; a no-op when it is current, as in CI).
    """
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(f"no Docker engine answers ({exc}): run `make docker-engine image`")
    build = subprocess.run([str(REPO / "docker" / "build-test-image.sh")], capture_output=True, text=True,
                           env={"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHON": str(REPO / ".venv/bin/python")})
    if build.returncode != 0:
        pytest.fail("the test images kiln-train:cpu and kiln-serve:cpu could not be built: run "
                    f"`make docker-engine image`\n{build.stdout[-2000:]}{build.stderr[-2000:]}")
    return client
