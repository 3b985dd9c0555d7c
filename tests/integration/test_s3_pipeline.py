"""The whole penguins pipeline with its artifacts, and MLflow's, in an S3 bucket (moto's server on loopback)."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, free_port, stop_model_servers
from s3_server import S3Endpoint, s3_endpoint  # noqa: F401

from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import make_context
from kiln.tasks.pipeline.runner import run_all
from kiln.tasks.pipeline.steps import STEPS
from kiln.tasks.steps.build_features import build_features
from kiln.tasks.steps.clean import clean
from kiln.tasks.steps.ingest import ingest
from kiln.tasks.steps.validate import validate
from kiln.tasks.storage.artifacts import ArtifactStoreError
from kiln.tasks.storage.s3 import MANIFEST, VERSIONS, S3ArtifactStore

pytestmark = [pytest.mark.integration, pytest.mark.s3]

PARAMS = {"epochs": 5, "nproc": 1}


def list_keys(client: Any, bucket: str, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


def read_object(client: Any, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_pipeline_on_s3(s3_endpoint: S3Endpoint, tmp_path: Path,  # noqa: F811
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step publishes a committed, hash-verified version to the bucket, none to local disk; the MLflow run's
    artifacts land in the same bucket under their own prefix."""
    bucket = f"kiln-{uuid.uuid4().hex[:10]}"
    client = s3_endpoint.client(direct=True)
    client.create_bucket(Bucket=bucket)
    home = tmp_path / "kiln"
    monkeypatch.setenv("KILN_HOME", str(home))
    monkeypatch.setenv("KILN_SERVE_PORT", str(free_port()))
    monkeypatch.setenv("KILN_ARTIFACT_ROOT", f"s3://{bucket}/kiln")
    monkeypatch.setenv("KILN_S3_ENDPOINT_URL", s3_endpoint.url)
    monkeypatch.setenv("KILN_MLFLOW_ARTIFACT_ROOT", f"s3://{bucket}/mlflow")
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)  # kiln sets it; restored after the test

    ctx = make_context(REPO / "dags" / "pipelines" / "penguins_species.yaml", "manual__s3_pipeline",
                                PARAMS)
    assert isinstance(ctx.store, S3ArtifactStore)
    try:
        results = run_all(ctx)
    finally:
        stop_model_servers(home / "serving")
    assert results["gate"].passed, results["gate"].reason
    assert results["promote"], "the run went through to the end of the rollout"

    # The store: one committed version per key, every file of it present with the recorded sha256, nothing else.
    # The run's steps publish under the run's prefix; the pipeline keeps its accepted snapshot, cache entries and
    # the record of what its endpoint serves.
    objects = list_keys(client, bucket, "kiln/")
    run_prefix = f"kiln/{ctx.run_key}/"
    pipeline_prefix = f"kiln/{ctx.spec.name}/"
    bases = {o.split(f"/{VERSIONS}/", 1)[0] if f"/{VERSIONS}/" in o else o.removesuffix(f"/{MANIFEST}")
             for o in objects}
    shared = {b for b in bases if not b.startswith(run_prefix)}
    assert objects and all(b.startswith((f"{pipeline_prefix}_accepted", f"{pipeline_prefix}_cache/",
                                         f"{pipeline_prefix}_serving"))
                           for b in shared), sorted(shared)[:5]
    assert f"{pipeline_prefix}_serving" in shared, "deploy recorded what the endpoint serves in the bucket"
    assert f"{pipeline_prefix}_accepted" in shared, "validate recorded the accepted snapshot in the bucket"
    steps = {b[len(run_prefix):] for b in bases - shared}
    # Every step publishes (verify only checks the endpoint), and register publishes the bundle.
    assert steps >= {s.name for s in STEPS if s.name not in ("register", "verify")} | {"bundle"}, sorted(steps)
    committed: set[str] = set()
    for base in sorted(bases):
        assert f"{base}/{MANIFEST}" in objects, f"{base} has objects but no committed manifest"
        manifest = json.loads(read_object(client, bucket, f"{base}/{MANIFEST}"))
        assert manifest["files"], f"{base} published no files"
        committed.add(f"{base}/{MANIFEST}")
        for rel, meta in manifest["files"].items():
            obj = f"{base}/{VERSIONS}/{manifest['version']}/{rel}"
            assert obj in objects, f"{obj} is in the manifest of {base} but not in the bucket"
            data = read_object(client, bucket, obj)
            assert (hashlib.sha256(data).hexdigest(), len(data)) == (meta["sha256"], meta["size"]), obj
            committed.add(obj)
    assert objects - committed == set(), "objects outside a committed version (a partial or stale upload)"
    checkpoints = json.loads(read_object(client, bucket, f"{run_prefix}{keys.CHECKPOINTS}/{MANIFEST}"))
    assert list(checkpoints["files"]) == [f"epoch_{PARAMS['epochs']:04d}.pt"], "the last checkpoint is in the bucket"
    assert not (home / "artifacts").exists() or not any((home / "artifacts").rglob("*")), \
        "step outputs were written to the local artifact folder"

    # MLflow: the run's artifacts and the registered model's bundle are in the bucket under the mlflow prefix.
    run_id = results["evaluate"].mlflow_run_id
    run_artifacts = f"mlflow/{ctx.spec.name}/{run_id}/artifacts/"
    logged = {o[len(run_artifacts):] for o in list_keys(client, bucket, run_artifacts)}
    assert "gate/decision.json" in logged, sorted(logged)
    assert json.loads(read_object(client, bucket, f"{run_artifacts}gate/decision.json"))["passed"] is True
    for folder in ("evaluate/", "validation/"):
        assert any(name.startswith(folder) for name in logged), f"no {folder} artifacts in {sorted(logged)}"
    assert "evaluate/confusion_matrix.png" in logged
    # The registered version is an MLflow Model (logged from the run) whose artifacts hold the bundle.
    from kiln.tasks.settings import get_settings
    from kiln.tasks.tracking.registry import Registry

    [version] = Registry(get_settings().mlflow_tracking_uri).versions(ctx.spec.name)
    prefix = f"s3://{bucket}/"
    assert version.source.startswith(f"{prefix}mlflow/{ctx.spec.name}/"), version.source
    model_files = {o[len(version.source) - len(prefix):].lstrip("/")
                   for o in list_keys(client, bucket, version.source[len(prefix):])}
    assert {"MLmodel", "artifacts/bundle/bundle.json", "artifacts/bundle/model.pt2"} <= model_files, \
        sorted(model_files)
    assert list_keys(client, bucket, "mlflow/") == list_keys(client, bucket, f"mlflow/{ctx.spec.name}/")


def test_a_step_cut_off_mid_upload_fails_cleanly_and_its_retry_succeeds(s3_endpoint: S3Endpoint,  # noqa: F811
                                                                         tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The endpoint goes away halfway through a step's upload, first on a step's first run, then on a re-run of a
    step with a committed version: the step fails naming the endpoint, readers see nothing new, and once the
    endpoint is back the retried step publishes and the next step reads it."""
    bucket = f"kiln-{uuid.uuid4().hex[:10]}"
    client = s3_endpoint.client(direct=True)
    client.create_bucket(Bucket=bucket)
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "kiln"))
    monkeypatch.setenv("KILN_ARTIFACT_ROOT", f"s3://{bucket}/kiln")
    monkeypatch.setenv("KILN_S3_ENDPOINT_URL", s3_endpoint.url)
    ctx = make_context(REPO / "dags" / "pipelines" / "penguins_species.yaml", "manual__s3_outage")
    clean_prefix = f"kiln/{ctx.run_key}/clean/"

    def cut_off(step: Any) -> None:
        s3_endpoint.kill_forwarder()
        s3_endpoint.start_forwarder(die_mid_upload=True)
        try:
            with pytest.raises(ArtifactStoreError) as caught:
                step(ctx)
            assert s3_endpoint.forwarder_died(), "the endpoint was to go away mid-upload, and did not"
        finally:
            s3_endpoint.kill_forwarder()
            s3_endpoint.start_forwarder()
        assert f"cannot reach the S3 endpoint {s3_endpoint.url} (bucket '{bucket}')" in str(caught.value)

    def committed() -> tuple[str, set[str]]:
        """The clean step's committed version and every object under its key."""
        manifest = json.loads(read_object(client, bucket, f"{clean_prefix}{MANIFEST}"))
        return manifest["version"], list_keys(client, bucket, clean_prefix)

    ingest(ctx)
    validate(ctx)

    # A first run cut off: no version, and no object at all under the key.
    cut_off(clean)
    assert not ctx.store.exists(ctx.key("clean"))
    assert list_keys(client, bucket, clean_prefix) == set(), "a cut-off upload left objects behind"
    staging = ctx.store.cache_dir / ".staging"
    assert not staging.exists() or not any(staging.iterdir()), "the failed step left its staging folder"

    clean(ctx)  # the retry
    first, objects = committed()
    assert objects and all(o == f"{clean_prefix}{MANIFEST}" or f"/{VERSIONS}/{first}/" in o for o in objects)

    # A re-run cut off: the committed version is untouched, for this machine's cache and for a fresh reader.
    cut_off(clean)
    assert committed() == (first, objects)
    fresh = S3ArtifactStore(f"s3://{bucket}/kiln", cache_dir=tmp_path / "fresh", endpoint_url=s3_endpoint.url)
    assert sorted(p.name for p in fresh.path(ctx.key("clean")).iterdir()) == \
        sorted(p.name for p in ctx.store.path(ctx.key("clean")).iterdir())

    clean(ctx)
    second, objects = committed()
    assert second != first
    assert all(o == f"{clean_prefix}{MANIFEST}" or f"/{VERSIONS}/{second}/" in o for o in objects), \
        "the retry's commit leaves only its own version"
    features = build_features(ctx)
    assert features, "the next step read the retried step's output"
