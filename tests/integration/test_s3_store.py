"""The S3 artifact store against a real S3 API on loopback (moto's server, over HTTP as to AWS)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from s3_server import LockedBucket, S3Endpoint, iam_endpoint, s3_endpoint  # noqa: F401

from kiln.tasks.pipeline.context import make_context
from kiln.tasks.steps.build_features import build_features
from kiln.tasks.steps.clean import clean
from kiln.tasks.steps.ingest import ingest
from kiln.tasks.steps.validate import validate
from kiln.tasks.storage.artifacts import ArtifactNotFoundError, ArtifactStoreError
from kiln.tasks.storage.s3 import MANIFEST, S3ArtifactStore

pytestmark = [pytest.mark.integration, pytest.mark.s3]

REPO = Path(__file__).resolve().parents[2]
MB = 1_000_000


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def bucket(s3_endpoint: S3Endpoint) -> str:  # noqa: F811
    name = f"kiln-{uuid.uuid4().hex[:10]}"
    s3_endpoint.client(direct=True).create_bucket(Bucket=name)
    return name


def make_store(endpoint: S3Endpoint, bucket: str, cache: Path, **kwargs: Any) -> S3ArtifactStore:
    return S3ArtifactStore(f"s3://{bucket}/kiln", cache_dir=cache, endpoint_url=endpoint.url, **kwargs)


def publish(store: S3ArtifactStore, key: str, files: dict[str, bytes]) -> None:
    with store.writer(key) as out:
        for rel, data in files.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)


def version_objects(endpoint: S3Endpoint, bucket: str, key: str) -> list[str]:
    answer = endpoint.client(direct=True).list_objects_v2(Bucket=bucket, Prefix=f"kiln/{key}/.v/")
    return [obj["Key"] for obj in answer.get("Contents", [])]


def manifest(endpoint: S3Endpoint, bucket: str, key: str) -> dict[str, Any]:
    body = endpoint.client(direct=True).get_object(Bucket=bucket, Key=f"kiln/{key}/{MANIFEST}")["Body"].read()
    return json.loads(body)


def test_round_trip_nested_and_multipart(s3_endpoint: S3Endpoint, bucket: str, tmp_path: Path) -> None:  # noqa: F811
    files = {"a.txt": b"alpha\n", "sub/b.json": b'{"b": 1}\n', "sub/deeper/c.bin": os.urandom(1000),
             "big.bin": os.urandom(50 * MB)}
    store = make_store(s3_endpoint, bucket, tmp_path / "writer-cache")
    publish(store, "p/run1/ingest", files)

    assert store.exists("p/run1/ingest") and not store.exists("p/run1/clean")
    assert store.uri("p/run1/ingest") == f"s3://{bucket}/kiln/p/run1/ingest"
    # A reader on another machine: an empty cache, so every file is downloaded and checked.
    reader = make_store(s3_endpoint, bucket, tmp_path / "reader-cache")
    folder = reader.path("p/run1/ingest")
    assert folder.is_relative_to(tmp_path / "reader-cache")
    got = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert {k: sha(v) for k, v in got.items()} == {k: sha(v) for k, v in files.items()}
    m = manifest(s3_endpoint, bucket, "p/run1/ingest")
    assert m["files"]["big.bin"] == {"sha256": sha(files["big.bin"]), "size": 50 * MB}
    big = f"kiln/p/run1/ingest/.v/{m['version']}/big.bin"
    head = s3_endpoint.client(direct=True).head_object(Bucket=bucket, Key=big)
    assert "-" in head["ETag"], "a 50 MB file goes up as a multipart upload"
    assert head["ContentLength"] == 50 * MB


def test_children_are_the_keys_under_a_key(s3_endpoint: S3Endpoint, bucket: str, tmp_path: Path) -> None:  # noqa: F811
    store = make_store(s3_endpoint, bucket, tmp_path / "cache")
    for key in ("p/_capture/version=1/a", "p/_capture/version=1/b", "p/_capture/version=2/c", "p/_capture"):
        publish(store, key, {"f": b"x"})
    # Each published key's own version folder (.v) is not a child; keys published under it are.
    assert store.children("p/_capture") == ["version=1", "version=2"]
    assert store.children("p/_capture/version=1") == ["a", "b"]
    assert store.children("p/nothing") == []


def test_overwrite_publishes_new_version_and_removes_old(s3_endpoint: S3Endpoint, bucket: str,  # noqa: F811
                                                         tmp_path: Path) -> None:
    store = make_store(s3_endpoint, bucket, tmp_path / "cache")
    publish(store, "k", {"x.txt": b"one", "old-only.txt": b"gone soon"})
    first = manifest(s3_endpoint, bucket, "k")["version"]
    publish(store, "k", {"x.txt": b"two"})
    second = manifest(s3_endpoint, bucket, "k")["version"]

    assert second != first
    assert version_objects(s3_endpoint, bucket, "k") == [f"kiln/k/.v/{second}/x.txt"]
    fresh = make_store(s3_endpoint, bucket, tmp_path / "fresh").path("k")
    assert sorted(p.name for p in fresh.iterdir()) == ["x.txt"] and (fresh / "x.txt").read_bytes() == b"two"


def test_a_commit_aborts_multipart_uploads_a_killed_writer_left(s3_endpoint: S3Endpoint, bucket: str,  # noqa: F811
                                                                   tmp_path: Path) -> None:
    """A writer killed mid-upload leaves an unfinished multipart upload whose parts S3 keeps (and bills); the next
    commit of the key aborts it. An upload under another key is not touched."""
    client = s3_endpoint.client(direct=True)
    leftovers = {}
    for key in ("k", "other"):
        obj = f"kiln/{key}/.v/{uuid.uuid4().hex}/big.bin"
        upload = client.create_multipart_upload(Bucket=bucket, Key=obj)["UploadId"]
        client.upload_part(Bucket=bucket, Key=obj, UploadId=upload, PartNumber=1, Body=os.urandom(5 * MB))
        leftovers[key] = obj

    publish(make_store(s3_endpoint, bucket, tmp_path / "cache"), "k", {"x.txt": b"one"})

    unfinished = [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    assert unfinished == [leftovers["other"]]


def test_the_cache_keeps_only_the_current_version_of_a_key(s3_endpoint: S3Endpoint, bucket: str,  # noqa: F811
                                                           tmp_path: Path) -> None:
    writer, reader = (make_store(s3_endpoint, bucket, tmp_path / name) for name in ("writer", "reader"))
    for i in range(3):
        publish(writer, "k", {"x.txt": f"v{i}".encode()})
        assert (reader.path("k") / "x.txt").read_bytes() == f"v{i}".encode()
    current = manifest(s3_endpoint, bucket, "k")["version"]
    for store in (writer, reader):
        assert [p.name for p in store._local("k").iterdir()] == [current]


def test_throttled_requests_are_retried_with_backoff(s3_endpoint: S3Endpoint, bucket: str,  # noqa: F811
                                                     tmp_path: Path) -> None:
    publish(make_store(s3_endpoint, bucket, tmp_path / "writer"), "k", {"x.txt": b"data"})

    with s3_endpoint.throttling(gets=2) as url:  # two 503 SlowDown answers, then the real one
        reader = S3ArtifactStore(f"s3://{bucket}/kiln", cache_dir=tmp_path / "a", endpoint_url=url, max_attempts=3)
        assert (reader.path("k") / "x.txt").read_bytes() == b"data"

    with s3_endpoint.throttling(gets=2) as url:  # the same throttling outlasts 2 attempts
        reader = S3ArtifactStore(f"s3://{bucket}/kiln", cache_dir=tmp_path / "b", endpoint_url=url, max_attempts=2)
        with pytest.raises(ArtifactStoreError, match=r"SlowDown while reading the manifest of s3://.*after 2 attempt"):
            reader.path("k")


def test_exception_in_writer_uploads_nothing(s3_endpoint: S3Endpoint, bucket: str, tmp_path: Path) -> None:  # noqa: F811
    store = make_store(s3_endpoint, bucket, tmp_path / "cache")
    publish(store, "k", {"x.txt": b"good"})
    before = version_objects(s3_endpoint, bucket, "k")

    with pytest.raises(RuntimeError, match="step failed"):
        with store.writer("k") as out:
            (out / "x.txt").write_bytes(b"bad")
            raise RuntimeError("step failed")

    assert version_objects(s3_endpoint, bucket, "k") == before
    assert (make_store(s3_endpoint, bucket, tmp_path / "fresh").path("k") / "x.txt").read_bytes() == b"good"


def test_missing_key_names_the_uri(s3_endpoint: S3Endpoint, bucket: str, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(ArtifactNotFoundError, match=f"s3://{bucket}/kiln/nothing/here"):
        make_store(s3_endpoint, bucket, tmp_path).path("nothing/here")


def test_tampered_object_is_refused(s3_endpoint: S3Endpoint, bucket: str, tmp_path: Path) -> None:  # noqa: F811
    store = make_store(s3_endpoint, bucket, tmp_path / "cache")
    publish(store, "k", {"x.txt": b"original"})
    obj = f"kiln/k/.v/{manifest(s3_endpoint, bucket, 'k')['version']}/x.txt"
    s3_endpoint.client(direct=True).put_object(Bucket=bucket, Key=obj, Body=b"tampered")

    with pytest.raises(ArtifactStoreError, match=f"s3://{bucket}/{obj} does not match its manifest"):
        make_store(s3_endpoint, bucket, tmp_path / "fresh").path("k")


def wait_for_uploaded_part(endpoint: S3Endpoint, bucket: str, prefix: str, timeout_s: float = 120.0) -> None:
    """Return once a multipart upload under ``prefix`` has at least one part on the server."""
    client = endpoint.client(direct=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for upload in client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", []):
            if client.list_parts(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]).get("Parts"):
                return
        time.sleep(0.02)  # the poll interval of a wait-for condition
    raise AssertionError(f"no multipart upload under {prefix} got a part within {timeout_s:.0f} s")


def test_endpoint_killed_mid_upload_keeps_previous_version(s3_endpoint: S3Endpoint, bucket: str,  # noqa: F811
                                                           tmp_path: Path) -> None:
    store = make_store(s3_endpoint, bucket, tmp_path / "cache", max_attempts=2)
    publish(store, "k", {"x.txt": b"previous"})
    previous = manifest(s3_endpoint, bucket, "k")["version"]
    outcome: dict[str, BaseException] = {}

    def upload() -> None:
        try:
            publish(store, "k", {"a-big.bin": os.urandom(160 * MB), "x.txt": b"next"})
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=upload)
    thread.start()
    try:
        wait_for_uploaded_part(s3_endpoint, bucket, "kiln/k/.v/")
        s3_endpoint.kill_forwarder()
    finally:
        thread.join(timeout=300)
    assert not thread.is_alive()
    error = outcome.get("error")
    assert isinstance(error, ArtifactStoreError), error
    assert f"cannot reach the S3 endpoint {s3_endpoint.url} (bucket '{bucket}')" in str(error)

    s3_endpoint.start_forwarder()
    assert manifest(s3_endpoint, bucket, "k")["version"] == previous
    reader = make_store(s3_endpoint, bucket, tmp_path / "reader")
    assert (reader.path("k") / "x.txt").read_bytes() == b"previous"

    publish(store, "k", {"x.txt": b"retried"})
    assert (make_store(s3_endpoint, bucket, tmp_path / "after").path("k") / "x.txt").read_bytes() == b"retried"
    current = manifest(s3_endpoint, bucket, "k")["version"]
    assert version_objects(s3_endpoint, bucket, "k") == [f"kiln/k/.v/{current}/x.txt"]


def test_missing_bucket(s3_endpoint: S3Endpoint, tmp_path: Path) -> None:  # noqa: F811
    store = make_store(s3_endpoint, "no-such-bucket", tmp_path)
    expected = f"bucket 'no-such-bucket' does not exist at {s3_endpoint.url}: create it"
    with pytest.raises(ArtifactStoreError, match=expected):
        store.exists("k")
    with pytest.raises(ArtifactStoreError, match=expected):
        publish(store, "k", {"x.txt": b"x"})


def test_unreachable_endpoint(tmp_path: Path, s3_endpoint: S3Endpoint) -> None:  # noqa: F811
    url = f"http://127.0.0.1:{free_port()}"
    store = S3ArtifactStore("s3://somewhere/kiln", cache_dir=tmp_path, endpoint_url=url, max_attempts=2)
    with pytest.raises(ArtifactStoreError, match=f"cannot reach the S3 endpoint {url} \\(bucket 'somewhere'\\)"):
        store.exists("k")


def test_wrong_credentials(iam_endpoint: LockedBucket, tmp_path: Path,  # noqa: F811
                           monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = iam_endpoint.endpoint
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(ArtifactStoreError, match=f"{endpoint.url} rejected the AWS credentials") as info:
        make_store(endpoint, "locked", tmp_path).exists("k")
    assert "'locked'" in str(info.value) and "not-the-secret" not in str(info.value)


def test_access_denied(iam_endpoint: LockedBucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    endpoint, key_id, secret = iam_endpoint.endpoint, iam_endpoint.key_id, iam_endpoint.secret
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with pytest.raises(ArtifactStoreError, match=f"access denied to bucket 'locked' at {endpoint.url}") as info:
        publish(make_store(endpoint, "locked", tmp_path), "k", {"x.txt": b"x"})
    assert secret not in str(info.value)


def test_pipeline_steps_publish_to_s3(s3_endpoint: S3Endpoint, bucket: str,  # noqa: F811
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_ARTIFACT_ROOT", f"s3://{bucket}/kiln")
    monkeypatch.setenv("KILN_S3_ENDPOINT_URL", s3_endpoint.url)
    ctx = make_context(REPO / "dags" / "pipelines" / "penguins_species.yaml", "manual__s3_steps")
    assert isinstance(ctx.store, S3ArtifactStore)

    for step in (ingest, validate, clean, build_features):
        step(ctx)

    client = s3_endpoint.client(direct=True)
    objects = {o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="kiln/")
               for o in page.get("Contents", [])}
    for step in ("ingest", "validate", "clean", "build_features"):
        base = f"kiln/{ctx.run_key}/{step}"
        m = manifest(s3_endpoint, bucket, f"{ctx.run_key}/{step}")
        assert m["files"], f"{step} published no files"
        for rel, meta in m["files"].items():
            obj = f"{base}/.v/{m['version']}/{rel}"
            assert obj in objects
            assert sha(client.get_object(Bucket=bucket, Key=obj)["Body"].read()) == meta["sha256"], obj
        assert f"{base}/{MANIFEST}" in objects
