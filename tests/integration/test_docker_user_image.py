"""The pipeline's own code and requirements in the Docker launcher, on a real engine: a user training loop (written
to kiln's public API, in ``tests/user_image_code``) that imports a package kiln's training image lacks runs as a
2-container gang in ``kiln-train-user:<hash>``, built FROM ``kiln-train:cpu`` with the code and the requirement;
the same inputs reuse the image without a build; a requirement pip cannot install fails naming it, and leaves no
image and no container behind.

Needs a Docker engine and the test image: ``make docker-engine image`` (``make test`` runs both first).
"""

from __future__ import annotations

from pathlib import Path

import docker
import pandas as pd
import pytest
from docker_engine import ready_engine
from synthetic import write_features

from kiln.tasks.bundle.program import PROGRAM_FILE
from kiln.tasks.launch.base import LOG_FILE
from kiln.tasks.launch.docker_gang import JOB_LABEL, DockerGangLauncher
from kiln.tasks.launch.requirements_check import RequirementError
from kiln.tasks.launch.user_image import IMAGE_REPOSITORY, USER_CODE_DIR, ensure_user_image
from kiln.tasks.pools.allocation import Allocation, NodeAllocation
from kiln.tasks.settings import get_settings
from kiln.tasks.spec import ModelSpec, TrainingSpec
from kiln.tasks.storage.artifacts import read_json
from kiln.tasks.training.job import METRICS_FILE, TrainConfig
from kiln.tasks.training.user_code import code_hash

pytestmark = [pytest.mark.docker, pytest.mark.integration]

CODE = Path(__file__).resolve().parents[1] / "user_image_code"
#: Pure Python, on this machine's package index, and not in kiln's training image: the loop imports it.
REQUIREMENT = "tabulate==0.10.0"
GIB = 1024**3


@pytest.fixture(scope="module")
def engine() -> docker.DockerClient:
    client = ready_engine()
    base = get_settings().train_image
    current = client.images.get(base).id
    # User images FROM an earlier test image (tasks/ changed since) only keep that image's layers alive.
    for image in client.images.list(filters={"label": "kiln.user-image"}):
        source, _, base_id = image.labels.get("kiln.base", "").partition("@")
        if source == base and base_id != current:
            for tag in image.tags:
                client.images.remove(tag)
    yield client
    client.close()


def two_nodes() -> Allocation:
    return Allocation(lease_id="test-lease", pool="local", nodes=(
        NodeAllocation("n0", cpus=(0,), memory=2 * GIB), NodeAllocation("n1", cpus=(1,), memory=2 * GIB)))


def user_loop_config(root: Path, requirements: list[str]) -> TrainConfig:
    raw = root / "raw" / "snapshot.parquet"
    raw.parent.mkdir(parents=True)
    pd.DataFrame({"a": range(37)}).to_parquet(raw)
    training = TrainingSpec(epochs=2, batch_size=32, learning_rate=0.05, seed=3, launcher="docker", nodes=2, nproc=1,
                            timeout_s=120, entrypoint="loop:train", params={"width": 16})
    return TrainConfig(features_dir=str(write_features(root / "features", n=400, d=6)),
                       output_dir=str(root / "out"), checkpoint_dir=str(root / "ckpt"), task="classification",
                       model=ModelSpec(hidden_sizes=[16]), training=training, code_dir=str(CODE),
                       code_hash=code_hash(CODE), raw_snapshot=str(raw), requirements=requirements,
                       mlflow_tracking_uri=get_settings().mlflow_tracking_uri)


def leftovers(client: docker.DockerClient, job: str | None) -> list[str]:
    selector = {"label": f"{JOB_LABEL}={job}"}
    return ([c.name for c in client.containers.list(all=True, filters=selector)]
            + [n.name for n in client.networks.list(filters=selector)])


def user_images(client: docker.DockerClient) -> set[str]:
    return {tag for image in client.images.list(name=IMAGE_REPOSITORY) for tag in image.tags}


def test_a_user_loop_with_its_own_requirement_trains_in_a_gang_of_user_image_containers(engine, tmp_path):
    config = user_loop_config(tmp_path, [REQUIREMENT])
    launcher = DockerGangLauncher()

    launcher.launch(config, nproc=1, workdir=tmp_path / "work", allocation=two_nodes())

    out = Path(config.output_dir)
    metrics = read_json(out / METRICS_FILE)
    assert metrics["world_size"] == 2
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert (out / PROGRAM_FILE).is_file()  # exported by kiln from what the loop handed back
    log = (tmp_path / "work" / LOG_FILE).read_text()
    # The loop ran from the image (not a mount of this host's folder), with tabulate installed there.
    assert f"{USER_CODE_DIR}/loop.py" in log and str(CODE) not in log
    assert "raw rows  37" in log  # the raw snapshot is mounted for loops that build their own features
    tag = next(line.split(" image ")[1].split()[0] for line in log.splitlines() if line.startswith("[launcher] "))
    # A second launch with the same code and requirements finds the image: no build.
    base = get_settings().train_image
    again = ensure_user_image(engine, base, code_dir=CODE, requirements=[REQUIREMENT], code_sha256=config.code_hash)
    assert (again.tag, again.built) == (tag, False)
    assert engine.images.get(tag).labels["kiln.input-hash"] == again.input_hash
    assert leftovers(engine, launcher.job_id) == []


def test_a_requirement_pip_cannot_install_fails_naming_it_and_leaves_nothing(engine, tmp_path):
    bad = "kiln-no-such-package==1.0"
    config = user_loop_config(tmp_path, [REQUIREMENT, bad])
    before = user_images(engine)
    launcher = DockerGangLauncher()

    with pytest.raises(RequirementError) as info:
        launcher.launch(config, nproc=1, workdir=tmp_path / "work", allocation=two_nodes())

    message = str(info.value)
    assert message.startswith(f"code.requirements: pip cannot install '{bad}' into the training image")
    assert f"No matching distribution found for {bad}" in message  # pip's own words
    assert [line for line, _ in info.value.problems] == [bad]
    assert user_images(engine) == before
    assert leftovers(engine, launcher.job_id) == []
