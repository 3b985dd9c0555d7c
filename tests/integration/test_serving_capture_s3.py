"""A model server kiln starts (``ensure_server``, as the deploy step does) on an S3 artifact store: it holds the
servers' own S3 keys (``KILN_SERVE_AWS_*``), never the platform's secret, and its captures land in the bucket,
where the monitor's window reader finds them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import free_port
from s3_server import S3Endpoint, s3_endpoint  # noqa: F401  (the session fixture)
from serving_fixtures import bundle_factory, records  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.s3]

PIPELINE = "penguins"
PLATFORM_SECRET = "platform-secret-never-in-a-server"
SERVE_KEYS = {"KILN_SERVE_AWS_ACCESS_KEY_ID": "serve-key-id", "KILN_SERVE_AWS_SECRET_ACCESS_KEY": "serve-secret"}


def test_a_server_captures_to_s3_with_its_own_keys_and_never_holds_the_platforms(
        bundle_factory, s3_endpoint: S3Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from kiln.tasks.monitoring.window import read_captures
    from kiln.tasks.serving.client import ServingClient
    from kiln.tasks.serving.deployment import CaptureSettings, Deployment, ModelRef, utc_now, write_deployment
    from kiln.tasks.serving.process import ensure_server, stop_server
    from kiln.tasks.storage.s3 import S3ArtifactStore

    bucket = "serving-capture"
    s3_endpoint.client(direct=True).create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/kiln"
    for name, value in {"KILN_ARTIFACT_ROOT": root, "KILN_S3_ENDPOINT_URL": s3_endpoint.url,
                        "AWS_ACCESS_KEY_ID": "platform-key-id", "AWS_SECRET_ACCESS_KEY": PLATFORM_SECRET,
                        "AWS_DEFAULT_REGION": "us-east-1", **SERVE_KEYS}.items():
        monkeypatch.setenv(name, value)
    deployment = tmp_path / "deployment.json"
    write_deployment(deployment, Deployment(PIPELINE, ModelRef("1", str(bundle_factory(0))), None, utc_now(),
                                            CaptureSettings(1.0)))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    server = ensure_server(deployment, host="127.0.0.1", port=free_port(), token="s3-capture-token",
                           run_dir=run_dir, die_with_parent=True)
    try:
        environ = Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
        assert b"AWS_ACCESS_KEY_ID=serve-key-id" in environ
        assert b"AWS_SECRET_ACCESS_KEY=serve-secret" in environ
        assert not [v for v in environ if PLATFORM_SECRET.encode() in v or v.startswith(b"KILN_SERVE_AWS_")]
        with ServingClient(server.url, "s3-capture-token") as client:
            sent = records(6)
            answer = client.predict(sent)
            assert len(answer["predictions"]) == 6
    finally:
        assert stop_server(run_dir, timeout_s=30)  # a stopping server writes what it holds
    store = S3ArtifactStore(root, cache_dir=tmp_path / "cache", endpoint_url=s3_endpoint.url)
    now = datetime.now(UTC)
    window = read_captures(store, PIPELINE, ["1"], now - timedelta(hours=1), now + timedelta(minutes=1))
    assert window.rows == 6 and window.skipped == []
    assert list(window.frame["record"]) == list(range(6))


def test_one_server_key_without_the_other_is_refused_naming_both() -> None:
    from kiln.tasks.serving.process import server_environment

    with pytest.raises(ValueError, match="KILN_SERVE_AWS_ACCESS_KEY_ID is set but KILN_SERVE_AWS_SECRET_ACCESS_KEY"):
        server_environment({"KILN_SERVE_AWS_ACCESS_KEY_ID": "id"})
    # Without server keys a server gets no key of kiln's at all (an instance role or profile still applies).
    env = server_environment({"AWS_ACCESS_KEY_ID": "platform", "AWS_SECRET_ACCESS_KEY": "secret", "PATH": "/bin"})
    assert env == {"PATH": "/bin"}
