"""The S3 store's local folders of killed processes are removed by the next one that uses them, never a live one's.

A writer stages a step's whole output under ``<cache>/.staging/write-*`` and a reader downloads a version into
``<cache>/<key>/.tmp-<version>-*``; both are real child processes here, killed with SIGKILL mid-way.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from s3_server import S3Endpoint, s3_endpoint  # noqa: F401

from kiln.tasks.storage.s3 import S3ArtifactStore

pytestmark = [pytest.mark.integration, pytest.mark.s3]

# argv: uri cache endpoint key what. Stops (until killed) inside a writer's body, or after a reader's download.
CHILD = r"""
import sys, time
from kiln.tasks.storage.s3 import S3ArtifactStore

uri, cache, endpoint, key, what = sys.argv[1:]
store = S3ArtifactStore(uri, cache_dir=cache, endpoint_url=endpoint)
if what == "write":
    with store.writer(key) as out:
        (out / "half.bin").write_bytes(b"x" * 1000)
        print(out, flush=True)
        time.sleep(600)
else:
    download = store._download
    def download_then_stop(key, manifest, into):
        download(key, manifest, into)
        print(into, flush=True)
        time.sleep(600)
    store._download = download_then_stop
    store.path(key)
"""


@pytest.fixture
def bucket(s3_endpoint: S3Endpoint) -> str:  # noqa: F811
    name = f"kiln-{uuid.uuid4().hex[:10]}"
    s3_endpoint.client(direct=True).create_bucket(Bucket=name)
    return name


def _stopped_child(endpoint: S3Endpoint, bucket: str, cache: Path, key: str, what: str) -> Path:
    """Run CHILD until it reports its folder, SIGKILL it, return the folder it left."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, f"s3://{bucket}/kiln", str(cache), endpoint.url, key,
                              what], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        folder = Path(child.stdout.readline().decode().strip())
    finally:
        child.kill()
        child.wait(timeout=60)
    assert folder.is_dir() and folder.is_relative_to(cache), f"the {what} child reported {folder}"
    return folder


def _publish(store: S3ArtifactStore, key: str, data: bytes) -> None:
    with store.writer(key) as out:
        (out / "x.bin").write_bytes(data)


def test_a_killed_writers_staging_folder_is_removed_by_the_next_writer(s3_endpoint: S3Endpoint,  # noqa: F811
                                                                       bucket: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    store = S3ArtifactStore(f"s3://{bucket}/kiln", cache_dir=cache, endpoint_url=s3_endpoint.url)
    left = _stopped_child(s3_endpoint, bucket, cache, "p/r/train", "write")
    with store.writer("p/r/other") as live:  # a live writer's staging folder is kept by a sweep
        _publish(store, "p/r/train", b"retry")
        assert not left.exists()
        assert live.is_dir()
        (live / "y.bin").write_bytes(b"y")
    assert (store.path("p/r/train") / "x.bin").read_bytes() == b"retry"
    assert list((cache / ".staging").iterdir()) == []


def test_a_killed_readers_download_is_removed_by_the_next_reader(s3_endpoint: S3Endpoint,  # noqa: F811
                                                                 bucket: str, tmp_path: Path) -> None:
    _publish(S3ArtifactStore(f"s3://{bucket}/kiln", cache_dir=tmp_path / "writer", endpoint_url=s3_endpoint.url),
             "p/r/ingest", b"data")
    cache = tmp_path / "reader"
    left = _stopped_child(s3_endpoint, bucket, cache, "p/r/ingest", "read")
    reader = S3ArtifactStore(f"s3://{bucket}/kiln", cache_dir=cache, endpoint_url=s3_endpoint.url)
    folder = reader.path("p/r/ingest")
    assert (folder / "x.bin").read_bytes() == b"data"
    assert not left.exists()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]
