"""``infra_validate``'s throwaway model server dies with its task: SIGKILL of the process that started it (a
killed task) leaves no server behind, where a deployed endpoint's server is meant to outlive the step that
started it. A real server process on a real bundle."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import serving_fixtures
from conftest import free_port

from kiln.tasks.processes import alive, stop_groups
from kiln.tasks.serving.deployment import Deployment, ModelRef, write_deployment

pytestmark = pytest.mark.integration

bundle_factory = serving_fixtures.bundle_factory

#: The task: start a server as infra_validate does, print its pid, then wait to be killed.
TASK = """
import sys
from pathlib import Path
from kiln.tasks.serving.process import ensure_server
handle = ensure_server(Path(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), token="t", run_dir=Path(sys.argv[3]),
                       die_with_parent=sys.argv[4] == "die")
print(handle.pid, flush=True)
import time; time.sleep(120)
"""


@pytest.mark.parametrize("dies", [True, False], ids=["throwaway", "endpoint"])
def test_a_throwaway_server_dies_with_the_task_that_started_it(tmp_path: Path, bundle_factory, dies: bool) -> None:
    deployment = write_deployment(tmp_path / "deployment.json",
                                  Deployment("m", ModelRef("1", str(bundle_factory()))))
    task = subprocess.Popen([sys.executable, "-c", TASK, str(deployment), str(free_port()), str(tmp_path / "run"),
                             "die" if dies else "stay"], stdout=subprocess.PIPE, text=True)
    server = 0
    try:
        assert task.stdout is not None
        server = int(task.stdout.readline())
        task.send_signal(signal.SIGKILL)
        task.wait(10)
        deadline = time.monotonic() + (10 if dies else 1)
        while alive(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alive(server) is not dies
    finally:
        task.kill()
        task.wait(10)
        if server:
            stop_groups({server}, grace_s=0)


def test_a_server_started_by_a_task_inherits_none_of_the_platforms_secrets(tmp_path: Path, bundle_factory,
                                                                            monkeypatch) -> None:
    """A deploy or infra_validate task holds Airflow's settings, the MLflow login and database URLs; the model
    server it starts needs none of them."""
    from kiln.tasks.serving.process import ensure_server, stop_server

    secrets = {"AIRFLOW__CORE__FERNET_KEY": "fernet-not-for-servers", "MLFLOW_TRACKING_PASSWORD": "mlflow-pw",
               "KILN_POOLS_DB_URL": "postgresql://u:pw@db/kiln_pools", "AWS_SECRET_ACCESS_KEY": "aws-secret"}
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    deployment = write_deployment(tmp_path / "deployment.json", Deployment("m", ModelRef("1", str(bundle_factory()))))
    handle = ensure_server(deployment, host="127.0.0.1", port=free_port(), token="t", run_dir=tmp_path / "run",
                           die_with_parent=True)
    try:
        environ = Path(f"/proc/{handle.pid}/environ").read_bytes().split(b"\0")
        names = {item.split(b"=", 1)[0].decode() for item in environ if item}
        assert not names & set(secrets), sorted(names & set(secrets))
        assert not any(name.startswith("AIRFLOW") for name in names)
        assert "KILN_SERVE_TOKEN" in names
    finally:
        stop_server(tmp_path / "run")
