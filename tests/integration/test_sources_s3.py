"""S3 sources against a real S3 API on loopback (moto's server): one object, a prefix of partitions, incremental
ingest of a new partition after the accepted snapshot, and each unreadable bucket, prefix or object."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from s3_server import LockedBucket, S3Endpoint, iam_endpoint, s3_endpoint  # noqa: F401

from kiln.tasks.pipeline.accepted import publish_accepted
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.pipeline.keys import SNAPSHOT_FILE, SNAPSHOT_MANIFEST_FILE
from kiln.tasks.sources.errors import SourceEmptyError, SourceReadError
from kiln.tasks.sources.listing import list_source
from kiln.tasks.sources.s3 import download
from kiln.tasks.spec import SourceSpec, load_spec
from kiln.tasks.steps.ingest import IngestConfig, IngestError, ingest, run_ingest
from kiln.tasks.storage.artifacts import LocalArtifactStore

pytestmark = [pytest.mark.integration, pytest.mark.s3]


@pytest.fixture
def bucket(s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> str:  # noqa: F811
    monkeypatch.setenv("KILN_S3_ENDPOINT_URL", s3_endpoint.url)
    name = f"src-{uuid.uuid4().hex[:10]}"
    s3_endpoint.client(direct=True).create_bucket(Bucket=name)
    return name


def put(endpoint: S3Endpoint, bucket: str, key: str, body: bytes | pd.DataFrame) -> str:
    if isinstance(body, pd.DataFrame):
        buf = io.BytesIO()
        body.to_parquet(buf)
        body = buf.getvalue()
    return endpoint.client(direct=True).put_object(Bucket=bucket, Key=key, Body=body)["ETag"].strip('"')


def snapshot(tmp_path: Path, uri: str, out: str = "out") -> tuple[pd.DataFrame, dict[str, Any]]:
    out_dir = tmp_path / out
    out_dir.mkdir()
    run_ingest(IngestConfig(SourceSpec(uri=uri)), out_dir)
    return pd.read_parquet(out_dir / SNAPSHOT_FILE), json.loads((out_dir / SNAPSHOT_MANIFEST_FILE).read_text())


def test_single_object(s3_endpoint: S3Endpoint, bucket: str, tmp_path: Path) -> None:  # noqa: F811
    etag = put(s3_endpoint, bucket, "raw/data.csv", b"a,label\n1,x\n2,y\n")
    df, manifest = snapshot(tmp_path, f"s3://{bucket}/raw/data.csv")
    assert df.to_dict("list") == {"a": [1, 2], "label": ["x", "y"]}
    assert manifest["source_uri"] == f"s3://{bucket}/raw/data.csv" and manifest["source_kind"] == "s3"
    (part,) = manifest["parts"]
    assert (part["name"], part["etag"], part["size"]) == ("data.csv", etag, 16)
    assert manifest["source_sha256"] == part["sha256"]


def test_prefix_of_partitions(s3_endpoint: S3Endpoint, bucket: str, tmp_path: Path) -> None:  # noqa: F811
    put(s3_endpoint, bucket, "lake/day=1/part-0.csv", b"a,label\n1,x\n")
    put(s3_endpoint, bucket, "lake/day=2/part-0.parquet", pd.DataFrame({"a": [2.5], "label": ["y"]}))
    put(s3_endpoint, bucket, "lake/_SUCCESS", b"")
    put(s3_endpoint, bucket, "lakehouse/other.csv", b"a,label\n9,z\n")  # a sibling prefix, not under lake/
    for out, uri in enumerate((f"s3://{bucket}/lake/", f"s3://{bucket}/lake")):
        df, manifest = snapshot(tmp_path, uri, out=str(out))
        assert df.to_dict("list") == {"a": [1.0, 2.5], "label": ["x", "y"]}
        assert [p["name"] for p in manifest["parts"]] == ["day=1/part-0.csv", "day=2/part-0.parquet"]


def test_incremental_append_reads_the_new_partition(s3_endpoint: S3Endpoint, bucket: str,  # noqa: F811
                                                    tmp_path: Path) -> None:
    put(s3_endpoint, bucket, "in/1.csv", b"a,label\n1,x\n2,y\n")
    spec_path = tmp_path / "p.yaml"
    spec_path.write_text(json.dumps({"name": "p", "target": "label", "task": "classification",
                                     "source": {"uri": f"s3://{bucket}/in/", "incremental": "append"}}))
    spec, store = load_spec(spec_path), LocalArtifactStore(tmp_path / "store")
    first = RunContext(spec=spec, run_key="p/r1", store=store, spec_path=str(spec_path))
    assert ingest(first).rows == 2
    publish_accepted(first, json.loads((store.path("p/r1/ingest") / SNAPSHOT_MANIFEST_FILE).read_text()), {})
    etag = put(s3_endpoint, bucket, "in/2.csv", b"a,label\n3,z\n")
    second = RunContext(spec=spec, run_key="p/r2", store=store, spec_path=str(spec_path),
                        trigger_events=({"uri": f"s3://{bucket}/in/", "parts": [
                            {"name": "2.csv", "etag": etag, "size": 12}]},))
    assert ingest(second).rows == 3
    manifest = json.loads((store.path("p/r2/ingest") / SNAPSHOT_MANIFEST_FILE).read_text())
    assert [(p["name"], p["etag"]) for p in manifest["parts"]] == [("2.csv", etag)]
    assert manifest["incremental"] == {"mode": "append", "previous_run": "p/r1", "previous_rows": 2, "new_rows": 1}
    assert pd.read_parquet(store.path("p/r2/ingest") / SNAPSHOT_FILE)["a"].tolist() == [1, 2, 3]


def test_object_replaced_after_listing_is_refused(s3_endpoint: S3Endpoint, bucket: str,  # noqa: F811
                                                  tmp_path: Path) -> None:
    put(s3_endpoint, bucket, "x/data.csv", b"a\n1\n")
    listing = list_source(SourceSpec(uri=f"s3://{bucket}/x/data.csv"))
    put(s3_endpoint, bucket, "x/data.csv", b"a\n2\n")
    with pytest.raises(SourceReadError, match=r"data\.csv changed after it was listed"):
        download(listing, listing.parts[0], tmp_path / "d.csv")


@pytest.mark.parametrize(("uri", "setup", "needles", "empty"), [
    ("s3://no-such-bucket-kiln/x.csv", None, ["bucket 'no-such-bucket-kiln' does not exist", "source.uri"], False),
    ("s3://{bucket}/empty/", None, ["no partition object under s3://{bucket}/empty/"], True),
    ("s3://{bucket}/typo.csv", None, ["no object s3://{bucket}/typo.csv and no partition object under"], True),
    ("s3://{bucket}/only-markers/", "only-markers/_SUCCESS", ["no partition object under"], True),
    ("s3://{bucket}/parts/", "parts/a.csv,parts/b.csv", ["partition s3://{bucket}/parts/b.csv", "extra column(s) c"],
     False),
    ("s3://{bucket}/x.csv", "nocreds", ["no AWS credentials for s3://{bucket}/x.csv", "KILN_S3_CONNECTION_ID"], False),
], ids=["no-such-bucket", "empty-prefix", "missing-object", "prefix-without-partitions", "partition-schema-differs",
        "missing-credentials"])
def test_unreadable_sources_name_the_object_and_publish_nothing(
        s3_endpoint: S3Endpoint, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        uri: str, setup: str | None, needles: list[str], empty: bool) -> None:
    """An empty prefix is a SourceEmptyError: ingest fails on it, a source watcher waits for the first delivery."""
    if setup == "nocreds":
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(name)
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    elif setup:
        for i, key in enumerate(setup.split(",")):
            put(s3_endpoint, bucket, key, b"a,b\n1,2\n" if i == 0 else b"a,b,c\n1,2,3\n")
    with pytest.raises(IngestError) as info:
        snapshot(tmp_path, uri.format(bucket=bucket))
    for needle in needles:
        assert needle.format(bucket=bucket) in str(info.value)
    assert isinstance(info.value, SourceEmptyError) is empty
    assert list((tmp_path / "out").iterdir()) == []


def test_access_denied_names_the_prefix_and_the_permissions(iam_endpoint: LockedBucket, tmp_path: Path,  # noqa: F811
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_S3_ENDPOINT_URL", iam_endpoint.endpoint.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", iam_endpoint.key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", iam_endpoint.secret)
    with pytest.raises(IngestError, match=r"access denied while listing s3://locked/in/ .*s3:ListBucket") as info:
        snapshot(tmp_path, "s3://locked/in/")
    assert iam_endpoint.secret not in str(info.value)
