"""Reading a window of captured traffic back from an S3 artifact store: the same batches as from a local one, a
batch of an unknown version skipped and reported."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from monitor_fixtures import PIPELINE, T0, capture_table, publish_capture, train_and_live
from s3_server import S3Endpoint, s3_endpoint  # noqa: F401  (the session fixture)

from kiln.tasks.monitoring.window import read_captures
from kiln.tasks.storage.artifacts import ArtifactStore

HOUR = timedelta(hours=1)


@pytest.fixture
def live() -> pa.Table:
    return capture_table(train_and_live()[1].head(120), step=timedelta(minutes=1))  # 60 requests over an hour


@pytest.mark.integration
@pytest.mark.s3
def test_an_s3_store_lists_the_same_batches(tmp_path: Path, s3_endpoint: S3Endpoint,  # noqa: F811
                                            live: pa.Table) -> None:
    from kiln.tasks.storage.s3 import S3ArtifactStore

    bucket = "monitor-window"
    s3_endpoint.client(direct=True).create_bucket(Bucket=bucket)
    s3: ArtifactStore = S3ArtifactStore(f"s3://{bucket}/kiln", cache_dir=tmp_path / "cache",
                                        endpoint_url=s3_endpoint.url)
    first = publish_capture(s3, live, seq=1)
    second = publish_capture(s3, live, seq=2)
    publish_capture(s3, capture_table(train_and_live()[1].head(4), version="v9"), folder_version="v1", seq=3)
    read = read_captures(s3, PIPELINE, ["v1"], T0, T0 + HOUR)
    assert read.files == [first, second] and read.rows == 240 and len(read.skipped) == 1
    assert s3.children(f"{PIPELINE}/_capture") == ["version=v1"]

