"""DockerTrainOperator end to end on a real engine: it leases a 2-node gang from the pool, trains the penguins
pipeline in two containers, and ``on_kill`` stops the gang, removes every container and network of the job and
releases the lease. The two "nodes" are inventory entries on this machine's one engine, one core each.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import docker
import pytest
import yaml
from docker_engine import ready_engine

pytestmark = [pytest.mark.docker, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
SPEC = str(REPO / "dags" / "pipelines" / "penguins_species.yaml")
INVENTORY = {"pools": {"local": {"placement": "spread", "nodes": [
    {"name": "n0", "address": "127.0.0.1", "cpus": [0], "memory": "4GiB"},
    {"name": "n1", "address": "127.0.0.1", "cpus": [1], "memory": "4GiB"}]}}}


@pytest.fixture
def two_node_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> docker.DockerClient:
    client = ready_engine()
    inventory = tmp_path / "pools.yaml"
    inventory.write_text(yaml.safe_dump(INVENTORY))
    monkeypatch.setenv("KILN_POOLS_FILE", str(inventory))
    monkeypatch.setenv("KILN_POOLS_DB_URL", f"sqlite:///{tmp_path / 'pools.db'}")
    yield client
    client.close()


def test_on_kill_stops_the_gang_and_releases_its_lease(two_node_pool: docker.DockerClient) -> None:
    from kiln.operators.train import DockerTrainOperator
    from kiln.tasks.launch.base import TrainingFailedError
    from kiln.tasks.launch.docker_gang import JOB_LABEL
    from kiln.tasks.pipeline import keys
    from kiln.tasks.pipeline.context import make_context
    from kiln.tasks.pipeline.runner import run_all
    from kiln.tasks.pools.store import LeaseStore

    run_id = "manual__docker_operator_kill"
    params = {"launcher": "docker", "nodes": 2, "nproc": 1, "epochs": 10_000}
    ctx = make_context(SPEC, run_id, params)
    run_all(ctx, until=keys.BUILD_FEATURES)
    checkpoints = ctx.store.scratch(ctx.key(keys.CHECKPOINTS))
    op = DockerTrainOperator(task_id="train", spec_path=SPEC)
    context = {"run_id": run_id, "params": params,
               "ti": SimpleNamespace(dag_id="penguins_species", run_id=run_id, task_id="train", try_number=1)}
    outcome: list[BaseException] = []

    def execute() -> None:
        try:
            op.execute(context)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=execute)
    worker.start()
    deadline = time.monotonic() + 180
    while len(list(checkpoints.glob("epoch_*.pt"))) < 2:
        assert worker.is_alive() and time.monotonic() < deadline, f"training did not get going: {outcome}"
        time.sleep(0.2)
    store = LeaseStore.from_settings()
    try:
        [lease] = store.leases()
        assert lease.state == "granted" and {n.node for n in lease.allocation.nodes} == {"n0", "n1"}
        job = op._launcher.job_id
        op.on_kill()
        op.on_kill()  # Airflow may call it twice
        worker.join(60)
        assert not worker.is_alive()
        assert outcome and isinstance(outcome[0], TrainingFailedError), outcome
        selector = {"label": f"{JOB_LABEL}={job}"}
        assert two_node_pool.containers.list(all=True, filters=selector) == []
        assert two_node_pool.networks.list(filters=selector) == []
        assert store.leases() == []
        assert store.lease(lease.id).state == "released"
    finally:
        store.close()
    assert not ctx.store.exists(ctx.key("train"))  # nothing half-written was published
