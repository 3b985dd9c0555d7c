"""Training through the S3 store (moto's server on loopback): data read from the bucket, checkpoints published to
it while the job runs, so that a retry on a machine with none of the first one's files resumes; and the same in
Docker containers, which get only local folders and no credentials."""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from s3_server import S3Endpoint, s3_endpoint  # noqa: F401
from synthetic import write_features

from kiln.tasks.launch.base import LOG_FILE, TrainingFailedError
from kiln.tasks.launch.torchrun import LocalTorchrunLauncher
from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import RunContext, make_context
from kiln.tasks.pools.allocation import Allocation, NodeAllocation
from kiln.tasks.steps.train import train
from kiln.tasks.storage.s3 import MANIFEST, VERSIONS, S3ArtifactStore

pytestmark = [pytest.mark.integration, pytest.mark.s3]

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "dags" / "pipelines" / "penguins_species.yaml"
EPOCHS = 8


@pytest.fixture
def s3_run(s3_endpoint: S3Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:  # noqa: F811
    """A bucket as the artifact root, and a KILN_HOME whose cache stands for one machine's disk."""
    bucket = f"kiln-{uuid.uuid4().hex[:10]}"
    client = s3_endpoint.client(direct=True)
    client.create_bucket(Bucket=bucket)
    home = tmp_path / "kiln"
    monkeypatch.setenv("KILN_HOME", str(home))
    monkeypatch.setenv("KILN_ARTIFACT_ROOT", f"s3://{bucket}/kiln")
    monkeypatch.setenv("KILN_S3_ENDPOINT_URL", s3_endpoint.url)
    return {"bucket": bucket, "client": client, "home": home}


def publish_features(ctx: RunContext, rows: int) -> None:
    """Synthetic features as the run's ``build_features`` output, straight into the bucket."""
    with ctx.store.writer(ctx.key("build_features")) as out:
        write_features(out, n=rows, d=8, n_classes=3, seed=7)


def checkpoint_manifest(s3_run: dict[str, Any], ctx: RunContext) -> dict[str, Any] | None:
    key = f"kiln/{ctx.run_key}/{keys.CHECKPOINTS}/{MANIFEST}"
    try:
        return json.loads(s3_run["client"].get_object(Bucket=s3_run["bucket"], Key=key)["Body"].read())
    except s3_run["client"].exceptions.NoSuchKey:
        return None


def published_epoch(manifest: dict[str, Any] | None) -> int:
    if not manifest:
        return 0
    (name,) = manifest["files"]  # the newest checkpoint only
    return int(name.removeprefix("epoch_").removesuffix(".pt"))


def test_a_retry_on_a_machine_without_the_first_ones_files_resumes_from_the_bucket(s3_run, caplog):
    caplog.set_level("INFO", logger="kiln.tasks.training.checkpoint_sync")
    params = {"epochs": EPOCHS, "nproc": 1, "batch_size": 16}
    ctx = make_context(SPEC, "manual__s3_resume", params)
    assert isinstance(ctx.store, S3ArtifactStore)
    publish_features(ctx, rows=24000)  # ~1.5 s an epoch on one core: time to act between checkpoints

    launcher = LocalTorchrunLauncher()
    errors: list[BaseException] = []

    def first_try() -> None:
        try:
            train(ctx, launcher)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=first_try)
    thread.start()
    deadline = time.monotonic() + 120
    while published_epoch(checkpoint_manifest(s3_run, ctx)) < 2:  # the bucket, not the local folder
        assert time.monotonic() < deadline and thread.is_alive(), "no checkpoint reached the bucket while training"
        time.sleep(0.1)
    launcher.terminate()  # the first machine's job dies
    thread.join(timeout=60)
    assert errors and isinstance(errors[0], TrainingFailedError)
    assert not ctx.store.exists(ctx.key("train")), "a killed job must publish no model"
    stored = published_epoch(checkpoint_manifest(s3_run, ctx))
    assert 2 <= stored < EPOCHS, f"the kill came too late to test a resume: epoch {stored} in the bucket"

    # Another machine: nothing of the first one's disk (cached features, scratch checkpoints) is there.
    shutil.rmtree(s3_run["home"] / "cache")
    retry = make_context(SPEC, "manual__s3_resume", params)
    result = train(retry)

    assert result.resumed_from_epoch == stored
    assert f"restored checkpoint epoch {stored} from s3://{s3_run['bucket']}/kiln/" in caplog.text
    log = (retry.input_dir("train") / LOG_FILE).read_text()
    assert f"resuming from checkpoint epoch {stored}" in log and f"epoch {EPOCHS}/{EPOCHS} done" in log
    final = checkpoint_manifest(s3_run, retry)
    assert published_epoch(final) == EPOCHS
    objects = s3_run["client"].list_objects_v2(Bucket=s3_run["bucket"],
                                               Prefix=f"kiln/{retry.run_key}/{keys.CHECKPOINTS}/")["Contents"]
    assert {o["Key"].rsplit("/", 1)[-1] for o in objects} == {MANIFEST, f"epoch_{EPOCHS:04d}.pt"}
    assert all(f"/{VERSIONS}/{final['version']}/" in o["Key"] for o in objects if not o["Key"].endswith(MANIFEST))
    assert not retry.store.scratch(retry.key(keys.CHECKPOINTS)).joinpath(f"epoch_{EPOCHS:04d}.pt").exists(), \
        "after a published model the local copy of the checkpoints is removed"


@pytest.mark.docker
def test_a_docker_job_reads_and_writes_the_bucket_through_the_host(s3_run):
    from docker_engine import ready_engine

    from kiln.tasks.launch.docker_gang import DockerGangLauncher

    ready_engine().close()
    ctx = make_context(SPEC, "manual__s3_docker", {"epochs": 3, "nproc": 1, "launcher": "docker"})
    publish_features(ctx, rows=2000)
    one_node = Allocation(lease_id="s3-docker", pool="local",
                          nodes=(NodeAllocation("n0", cpus=(0,), memory=2 * 1024**3),))

    result = train(ctx, DockerGangLauncher(), allocation=one_node)

    assert result.model_uri == f"s3://{s3_run['bucket']}/kiln/{ctx.run_key}/train"
    model = json.loads(s3_run["client"].get_object(Bucket=s3_run["bucket"],
                                                   Key=f"kiln/{ctx.run_key}/train/{MANIFEST}")["Body"].read())
    assert {"model.pt", "train_metrics.json", LOG_FILE} <= set(model["files"])
    assert "[n0] " in (ctx.input_dir("train") / LOG_FILE).read_text()  # it ran in the container
    assert published_epoch(checkpoint_manifest(s3_run, ctx)) == 3
