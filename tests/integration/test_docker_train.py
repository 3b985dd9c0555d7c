"""The Docker launcher on a real engine: a 2-node gang of ``kiln-train:cpu`` containers (torchrun, c10d rendezvous,
gloo) trains, survives a killed container by restarting from its checkpoint, stops on ``terminate()`` and at its
timeout, checkpoints and stops on ``preempt()`` without a restart, and turns a GPU request the engine cannot serve
into a clear error. Nothing is mocked except the GPU: the lease in the last test names a GPU this machine does not
have. After every test no container or network of the job is left on the engine.

Needs a Docker engine and the test image: ``make docker-engine image`` (``make test`` runs both first).
"""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from pathlib import Path

import docker
import pytest
from docker_engine import ready_engine
from synthetic import write_features

from kiln.tasks.launch.base import LOG_FILE, TrainingFailedError, TrainingPreemptedError, TrainingTimeoutError
from kiln.tasks.launch.docker_gang import JOB_LABEL, ContainerStartError, DockerGangLauncher
from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import make_context
from kiln.tasks.pipeline.runner import run_all
from kiln.tasks.pools.allocation import Allocation, NodeAllocation
from kiln.tasks.settings import get_settings
from kiln.tasks.spec import ModelSpec, TrainingSpec
from kiln.tasks.steps.evaluate import evaluate
from kiln.tasks.steps.train import train
from kiln.tasks.storage.artifacts import read_json
from kiln.tasks.training.job import METRICS_FILE, TrainConfig
from kiln.tasks.training.networks import MODEL_FILE

pytestmark = [pytest.mark.docker, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "dags" / "pipelines" / "penguins_species.yaml"
GIB = 1024**3


@pytest.fixture(scope="module")
def engine() -> docker.DockerClient:
    client = ready_engine()
    yield client
    client.close()


def two_nodes(**node) -> Allocation:
    """A hand-made 2-node lease on the local engine, one core and 2 GiB each."""
    return Allocation(lease_id="test-lease", pool="local", nodes=(
        NodeAllocation("n0", cpus=(0,), memory=2 * GIB, **node), NodeAllocation("n1", cpus=(1,), memory=2 * GIB)))


def leftovers(client: docker.DockerClient, job: str | None) -> list[str]:
    assert job, "the launcher never started a job"
    selector = {"label": f"{JOB_LABEL}={job}"}
    return ([c.name for c in client.containers.list(all=True, filters=selector)]
            + [n.name for n in client.networks.list(filters=selector)])


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def log_has(workdir: Path, text: str) -> bool:
    log = workdir / LOG_FILE
    return log.exists() and text in log.read_text()


def synthetic_config(root: Path, **training) -> TrainConfig:
    """A job on synthetic features; ~4000 rows per rank at batch 8 make each epoch long enough to act mid-run."""
    settings = {"epochs": 6, "batch_size": 8, "learning_rate": 2e-3, "seed": 5, "log_every_steps": 100,
                "launcher": "docker", "nodes": 2, "nproc": 1, "timeout_s": 240, **training}
    return TrainConfig(features_dir=str(write_features(root / "features", n=8000, d=8, seed=2)),
                       output_dir=str(root / "out"), checkpoint_dir=str(root / "ckpt"), task="classification",
                       model=ModelSpec(hidden_sizes=[64, 32]), training=TrainingSpec(**settings),
                       mlflow_tracking_uri=get_settings().mlflow_tracking_uri)


def launch_in_thread(launcher: DockerGangLauncher, config: TrainConfig, workdir: Path,
                     allocation: Allocation) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(launcher.launch(config, nproc=1, workdir=workdir, allocation=allocation))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=run, name="docker-launch")
    thread.start()
    return thread, outcome


def test_a_two_node_gang_trains_the_penguins_pipeline_in_containers(engine):
    from mlflow.tracking import MlflowClient

    ctx = make_context(SPEC, "docker_gang", {"launcher": "docker", "nodes": 2, "nproc": 1, "epochs": 5})
    run_all(ctx, until=keys.BUILD_FEATURES)
    launcher = DockerGangLauncher()

    trained = train(ctx, launcher, allocation=two_nodes())

    out = ctx.input_dir("train")  # where the local launcher publishes too
    metrics = read_json(out / METRICS_FILE)
    assert metrics["world_size"] == 2
    checksums = metrics["param_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1], "DDP replicas diverged across the containers"
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4, 5]
    assert (out / MODEL_FILE).is_file()
    assert trained.model_uri == ctx.store.uri(ctx.key("train"))
    log = (out / LOG_FILE).read_text()
    assert "[n0] " in log and "epoch 5/5 done" in log
    # Rank 0 logged every epoch to the host's MLflow store from inside its container.
    history = MlflowClient(get_settings().mlflow_tracking_uri).get_metric_history(trained.mlflow_run_id,
                                                                                  "train/loss")
    assert len(history) == 5
    # The host reads what the containers wrote: the evaluate step scores the published model.
    assert evaluate(ctx).metrics["test/accuracy"] > 0.8
    assert leftovers(engine, launcher.job_id) == []


def test_on_the_host_network_the_nodes_meet_at_their_addresses(engine, tmp_path):
    # Two addresses of this host stand in for two hosts; each node announces its own (torchrun --local_addr).
    config = synthetic_config(tmp_path, epochs=2, docker={"network": "host"})
    allocation = Allocation(lease_id="test-lease", pool="local", nodes=(
        NodeAllocation("n0", address="127.0.0.1", cpus=(0,), memory=2 * GIB),
        NodeAllocation("n1", address="127.0.0.2", cpus=(1,), memory=2 * GIB)))
    launcher = DockerGangLauncher()
    launcher.launch(config, nproc=1, workdir=tmp_path / "work", allocation=allocation)
    metrics = read_json(Path(config.output_dir) / METRICS_FILE)
    assert metrics["world_size"] == 2 and metrics["param_checksums"][0] == metrics["param_checksums"][1]
    lines = (tmp_path / "work" / LOG_FILE).read_text().splitlines()
    assert any(line.startswith("[n0] ") and " rank0 INFO " in line for line in lines), "rank 0 is not on node n0"
    assert leftovers(engine, launcher.job_id) == []


def test_a_killed_container_restarts_the_gang_from_its_checkpoint(engine, tmp_path):
    config = synthetic_config(tmp_path, max_restarts=1)
    launcher = DockerGangLauncher()
    thread, outcome = launch_in_thread(launcher, config, tmp_path / "work", two_nodes())
    # Rank 0 logs "epoch 2/6 done" before it writes that checkpoint; the file appears only once complete.
    checkpoint = Path(config.checkpoint_dir) / "epoch_0002.pt"
    wait_for(checkpoint.exists, 180, f"{checkpoint} to be written")
    victim = engine.containers.list(filters={"label": [f"{JOB_LABEL}={launcher.job_id}", "kiln.node=n1"]})
    assert len(victim) == 1
    victim[0].kill()  # as the OOM killer or a lost node would
    thread.join(timeout=240)

    assert not thread.is_alive()
    assert not isinstance(outcome[0], BaseException), outcome[0]
    log = (tmp_path / "work" / LOG_FILE).read_text()
    assert "node n1 exited with code 137; restarting the gang from its last checkpoint (restart 1 of 1)" in log
    metrics = read_json(Path(config.output_dir) / METRICS_FILE)
    assert metrics["resumed_from_epoch"] >= 2
    assert f"resuming from checkpoint epoch {metrics['resumed_from_epoch']}" in log
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4, 5, 6]
    assert metrics["param_checksums"][0] == metrics["param_checksums"][1]
    assert leftovers(engine, launcher.job_id) == []


def test_terminate_stops_the_gang_and_leaves_nothing(engine, tmp_path):
    config = synthetic_config(tmp_path, epochs=1000, max_restarts=3)  # only terminate() ends it
    launcher = DockerGangLauncher()
    thread, outcome = launch_in_thread(launcher, config, tmp_path / "work", two_nodes())
    wait_for(lambda: log_has(tmp_path / "work", "epoch 1/1000 done"), 180, "training to run")

    launcher.terminate()  # as the Airflow operator's on_kill does, from another thread
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert isinstance(outcome[0], TrainingFailedError) and "was terminated" in str(outcome[0])
    assert "restarting" not in (tmp_path / "work" / LOG_FILE).read_text()  # terminated is not a failure to retry
    launcher.terminate()  # safe again once the job is gone
    assert leftovers(engine, launcher.job_id) == []
    with pytest.raises(TrainingFailedError, match="terminated before it started"):
        launcher.launch(config, nproc=1, workdir=tmp_path / "again", allocation=two_nodes())


def test_a_preempted_gang_checkpoints_stops_without_a_restart_and_leaves_nothing(engine, tmp_path):
    config = synthetic_config(tmp_path, epochs=1000, max_restarts=3)  # a restart would train on
    launcher = DockerGangLauncher()
    thread, outcome = launch_in_thread(launcher, config, tmp_path / "work", two_nodes())
    wait_for(lambda: log_has(tmp_path / "work", "epoch 1/1000 done"), 180, "training to run")

    started = time.monotonic()
    launcher.preempt(grace_s=60)  # as the pool's preemption does, from another thread
    thread.join(timeout=30)
    assert not thread.is_alive()
    error = outcome[0]
    assert isinstance(error, TrainingPreemptedError) and error.killed is False, error
    assert time.monotonic() - started < 30, "the gang did not stop at its next checkpoint"
    log = (tmp_path / "work" / LOG_FILE).read_text()
    assert "restarting" not in log
    saved = re.search(r"\[n0\] .* preempted: checkpoint of epoch (\d+) saved; exiting with 75", log)
    assert saved, "rank 0 did not report the checkpoint it saved"
    assert (Path(config.checkpoint_dir) / f"epoch_{int(saved[1]):04d}.pt").is_file()
    launcher.preempt(grace_s=60)  # safe again once the job is gone
    assert leftovers(engine, launcher.job_id) == []


def test_a_job_past_its_timeout_is_killed_and_leaves_nothing(engine, tmp_path):
    config = synthetic_config(tmp_path, epochs=1000, timeout_s=10, max_restarts=3)  # 10 s: the smallest allowed
    launcher = DockerGangLauncher()
    started = time.monotonic()
    with pytest.raises(TrainingTimeoutError, match="ran past its 10 s timeout"):
        launcher.launch(config, nproc=1, workdir=tmp_path / "work", allocation=two_nodes())
    assert 10 <= time.monotonic() - started < 10 + 10
    assert leftovers(engine, launcher.job_id) == []


# The one mock: the lease names a GPU. On this engine (no NVIDIA runtime) the container is created and then refused
# at start, which the docker SDK leaves behind; the launcher must remove it and say what to fix.
def test_a_gpu_lease_on_an_engine_without_gpus_fails_clearly_and_leaves_nothing(engine, tmp_path):
    config = synthetic_config(tmp_path, epochs=1)
    launcher = DockerGangLauncher()
    with pytest.raises(ContainerStartError) as info:
        launcher.launch(config, nproc=1, workdir=tmp_path / "work", allocation=two_nodes(gpus=("0",)))
    assert info.value.node == "n0"
    if "nvidia" not in engine.info().get("Runtimes", {}):
        assert "has no GPU runtime" in str(info.value) and "NVIDIA Container Toolkit" in str(info.value)
    assert leftovers(engine, launcher.job_id) == []


def test_a_ulimit_the_kernel_refuses_fails_clearly_and_leaves_nothing(engine, tmp_path):
    # Above fs.nr_open (1048576 unless raised), so no engine may set it, CAP_SYS_RESOURCE or not.
    config = synthetic_config(tmp_path, epochs=1)
    training = config.training.model_copy(update={"docker": config.training.docker.model_copy(
        update={"ulimits": {"nofile": (1 << 21, 1 << 21)}})})
    config = TrainConfig(**{**config.__dict__, "training": training})
    launcher = DockerGangLauncher()
    with pytest.raises(ContainerStartError, match="training.docker.ulimits"):
        launcher.launch(config, nproc=1, workdir=tmp_path / "work", allocation=two_nodes())
    assert leftovers(engine, launcher.job_id) == []


def test_a_gang_trains_on_files_a_service_made_private(engine, tmp_path):
    """Under `kiln up` tasks run with umask 077, so the features they write are root's alone; a gang whose
    containers run as another user (the launcher runs as root here) must still read them, and write its outputs."""
    old = os.umask(0o077)
    try:
        config = synthetic_config(tmp_path, epochs=1)
        assert stat.S_IMODE((Path(config.features_dir) / "train.parquet").stat().st_mode) == 0o600
        launcher = DockerGangLauncher()
        launcher.launch(config, nproc=1, workdir=tmp_path / "work", allocation=two_nodes())
    finally:
        os.umask(old)
    assert (Path(config.output_dir) / MODEL_FILE).is_file()
    assert leftovers(engine, launcher.job_id) == []
