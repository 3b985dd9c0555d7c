"""Containers of a training job never outlive the process that launched them: SIGKILL of the launching task
leaves no container of the job within 10 s (its watchdog removes them), and a launch sweeps away the containers
of launchers that are gone (the watchdog killed too). Real engine, real containers.

Needs a Docker engine and the test image: ``make docker-engine image``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import docker
import pytest
from docker_engine import ready_engine
from synthetic import write_features

from kiln.tasks.launch.container_reaper import owner_label, sweep_orphans
from kiln.tasks.launch.containers import JOB_LABEL, OWNER_LABEL
from kiln.tasks.settings import get_settings
from kiln.tasks.spec import ModelSpec, TrainingSpec
from kiln.tasks.training.job import TrainConfig

pytestmark = [pytest.mark.docker, pytest.mark.integration]

#: The task process: the Docker launcher on a config file, as DockerTrainOperator runs it.
TASK = """
import sys
from pathlib import Path
from kiln.tasks.launch.docker_gang import DockerGangLauncher
from kiln.tasks.training.job import TrainConfig
config = TrainConfig.from_json(Path(sys.argv[1]).read_text())
DockerGangLauncher().launch(config, nproc=1, workdir=Path(sys.argv[2]))
"""


@pytest.fixture(scope="module")
def engine() -> docker.DockerClient:
    client = ready_engine()
    yield client
    client.close()


def owned_by(client: docker.DockerClient, pid: int) -> list[str]:
    host = socket.gethostname()
    return [c["Names"][0].lstrip("/") for c in client.api.containers(all=True, filters={"label": OWNER_LABEL})
            if c["Labels"][OWNER_LABEL].startswith(f"{host}/{pid}/")]


def wait_for(condition, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.1)
    return time.monotonic() - start


def test_sigkill_of_the_launching_task_removes_the_jobs_containers_within_10_s(engine, tmp_path):
    config = TrainConfig(
        features_dir=str(write_features(tmp_path / "features", n=8000, d=8, seed=2)), output_dir=str(tmp_path / "out"),
        checkpoint_dir=str(tmp_path / "ckpt"), task="classification", model=ModelSpec(hidden_sizes=[64, 32]),
        training=TrainingSpec(epochs=50, batch_size=8, launcher="docker", nodes=2, nproc=1, timeout_s=240),
        mlflow_tracking_uri=get_settings().mlflow_tracking_uri)
    (tmp_path / "config.json").write_text(config.to_json())
    (tmp_path / "work").mkdir()
    task = subprocess.Popen([sys.executable, "-c", TASK, str(tmp_path / "config.json"), str(tmp_path / "work")],
                            stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(owned_by(engine, task.pid)) == 2, 120, "both containers to be created")
        time.sleep(2)  # started and training
        os.kill(task.pid, signal.SIGKILL)
        task.wait(10)
        gone_s = wait_for(lambda: not owned_by(engine, task.pid), 10, "the job's containers to be removed")
        print(f"containers removed {gone_s:.2f} s after SIGKILL of their task")
    finally:
        task.kill()
        task.wait(10)
        for name in owned_by(engine, task.pid):
            engine.api.remove_container(name, force=True)


def test_a_launch_sweeps_away_containers_whose_launcher_is_gone(engine):
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    labels = {f"{host}/{dead.pid}/0.00": "orphan", owner_label(): "owned", f"another-host/{dead.pid}/0.00": "remote"}
    created = []
    try:
        for owner, job in labels.items():
            created.append(engine.containers.create(get_settings().train_image, command=["sleep", "60"],
                                                    labels={JOB_LABEL: f"sweep-test-{job}", OWNER_LABEL: owner}))
        removed = sweep_orphans(engine)
        left = {c["Labels"][JOB_LABEL] for c in engine.api.containers(all=True, filters={"label": OWNER_LABEL})}
        assert [c.name for c in created[:1]] == removed
        assert "sweep-test-orphan" not in left
        assert {"sweep-test-owned", "sweep-test-remote"} <= left  # a live launcher's, another host's: kept
    finally:
        for container in created:
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass
