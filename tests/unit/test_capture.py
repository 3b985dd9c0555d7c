"""Traffic capture and feedback without a server: request ids that prove their capture, the bounded buffers, the
flusher and the Parquet files it publishes in the artifact store."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiln.tasks.features.transform import FeatureTransform
from kiln.tasks.serving.capture import Capture, CaptureOptions, RequestIds, caller_request_id
from kiln.tasks.serving.capture_format import capture_key, feedback_key, hour_of, parse_feedback
from kiln.tasks.serving.deployment import DEFAULT_CAPTURE_SHARE, CaptureSettings, Deployment
from kiln.tasks.serving.inputs import RequestError
from kiln.tasks.serving.metrics import ServerMetrics
from kiln.tasks.storage.artifacts import LocalArtifactStore

TOKEN = "unit-test-kiln-token"
CLASSES = ("Adelie", "Chinstrap", "Gentoo")


def classifier_bundle(task: str = "classification") -> SimpleNamespace:
    """What the capture reads of a bundle: a real fitted transform and its classes."""
    df = pd.DataFrame({"bill_length_mm": [39.0, 49.0, 47.0, 41.0], "island": ["Biscoe", "Dream", "Biscoe", "Dream"],
                       "species": ["Adelie", "Chinstrap", "Gentoo", "Adelie"], "mass": [3.1, 3.9, 5.0, 3.3]})
    target = "species" if task == "classification" else "mass"
    transform = FeatureTransform.fit(df, {"bill_length_mm": "numeric", "island": "categorical"}, target, task,
                                     "standard", 10)
    return SimpleNamespace(transform=transform, classes=transform.classes)


def variant(version: str = "1", role: str = "champion", task: str = "classification") -> SimpleNamespace:
    return SimpleNamespace(version=version, role=role, bundle=classifier_bundle(task))


def make_capture(root: Path, **options) -> tuple[Capture, ServerMetrics]:
    metrics = ServerMetrics()
    capture = Capture(LocalArtifactStore(root), TOKEN, metrics, random.Random(0).random, CaptureOptions(**options))
    return capture, metrics


def metric(metrics: ServerMetrics, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name} {labels}")


def probabilities(n: int, seed: int = 0) -> np.ndarray:
    y = np.random.default_rng(seed).random((n, 3)).astype(np.float32)
    return y / y.sum(axis=1, keepdims=True)


def read_all(root: Path, pattern: str) -> pa.Table:
    files = sorted(root.glob(pattern))
    assert files, f"no file matches {pattern} under {root}"
    return pa.concat_tables([pq.read_table(f) for f in files])


RECORDS = [{"bill_length_mm": 39.5, "island": "Biscoe", "extra": "ignored"}, {"bill_length_mm": None, "island": None},
           {"bill_length_mm": 50, "island": True}]


def test_a_minted_id_proves_its_capture_and_a_plain_or_altered_one_does_not():
    ids = RequestIds(TOKEN)
    minted = ids.mint()

    assert len(minted) == 32 and int(minted, 16) >= 0
    assert ids.is_captured(minted, 0.0)  # a server's own captured id does not depend on the share
    assert not ids.is_captured(RequestIds.plain(), 1.0)
    assert not ids.is_captured(minted[:-1] + ("0" if minted[-1] != "0" else "1"), 1.0)
    assert not RequestIds("another-kiln-token").is_captured(minted, 1.0)
    assert RequestIds(TOKEN).is_captured(minted, 0.1)  # another replica or a restart with the same token agrees


def test_caller_ids_are_sampled_by_the_share_and_stay_sampled_when_it_grows():
    ids = RequestIds(TOKEN)
    callers = [f"order-{i}" for i in range(4000)]

    at_tenth = {c for c in callers if ids.is_captured(c, 0.1)}
    at_half = {c for c in callers if ids.is_captured(c, 0.5)}

    assert 0.08 < len(at_tenth) / len(callers) < 0.12
    assert 0.46 < len(at_half) / len(callers) < 0.54
    assert at_tenth <= at_half
    assert all(ids.is_captured(c, 1.0) for c in callers) and not any(ids.is_captured(c, 0.0) for c in callers)


@pytest.mark.parametrize(("headers", "expected"), [
    ([(b"x-request-id", b"order-17.a_B")], "order-17.a_B"),
    ([(b"x-request-id", b"x" * 64)], "x" * 64),
    ([(b"x-request-id", b"x" * 65)], None),
    ([(b"x-request-id", b"has space")], None),
    ([(b"x-request-id", b"")], None),
    ([(b"content-type", b"application/json")], None),
], ids=["valid", "64_chars", "too_long", "bad_character", "empty", "absent"])
def test_a_caller_id_is_kept_only_when_valid(headers, expected):
    assert caller_request_id(headers) == expected


def test_captured_records_are_written_with_the_design_columns_and_keys(tmp_path):
    capture, metrics = make_capture(tmp_path, flush_s=60)
    v = variant()
    started = time.perf_counter()
    y = probabilities(len(RECORDS))

    ids = [capture.answered("penguins", 1.0, v, RECORDS, y, None, started, 200) for _ in range(2)]
    asyncio.run(capture.flush())

    hour = hour_of(time.time())
    table = read_all(tmp_path, f"penguins/_capture/version=1/hour={hour}/*/capture.parquet")
    assert table.column_names == ["request_id", "record", "received_at", "version", "variant", "bill_length_mm",
                                  "island", "predicted_class", "predicted_value"]
    assert table.schema.field("record").type == pa.int32()
    assert table.schema.field("received_at").type == pa.timestamp("us", tz="UTC")
    assert table.schema.field("bill_length_mm").type == pa.float64()
    assert table.schema.field("island").type == pa.string()
    rows = table.to_pylist()
    assert [(r["request_id"], r["record"]) for r in rows] == [(i, k) for i in ids for k in range(3)]
    assert [r["bill_length_mm"] for r in rows[:3]] == [39.5, None, 50.0]
    assert [r["island"] for r in rows[:3]] == ["Biscoe", None, "True"]
    assert {r["version"] for r in rows} == {"1"} and {r["variant"] for r in rows} == {"champion"}
    assert [r["predicted_class"] for r in rows[:3]] == [CLASSES[i] for i in y.argmax(axis=1)]
    assert [r["predicted_value"] for r in rows[:3]] == pytest.approx(y.max(axis=1).tolist())
    assert abs(rows[0]["received_at"].timestamp() - time.time()) < 60
    assert all(RequestIds(TOKEN).is_captured(i, 0.0) for i in ids)
    assert metric(metrics, "kiln_capture_records_total") == 6
    assert metric(metrics, "kiln_capture_flushes_total", status="ok") == 1
    assert metric(metrics, "kiln_capture_buffered_records") == 0


def test_regression_rows_have_a_value_and_no_class(tmp_path):
    capture, _ = make_capture(tmp_path)
    capture.answered("fares", 1.0, variant(task="regression"), RECORDS[:2], np.array([3.5, 4.25], np.float32), None,
                     time.perf_counter(), 100)
    asyncio.run(capture.flush())

    rows = read_all(tmp_path, "fares/_capture/version=1/*/*/capture.parquet").to_pylist()
    assert [(r["predicted_class"], r["predicted_value"]) for r in rows] == [(None, 3.5), (None, 4.25)]


def test_each_hour_and_version_gets_its_own_file(tmp_path):
    capture, _ = make_capture(tmp_path)
    now = time.perf_counter()
    capture.answered("penguins", 1.0, variant("1"), RECORDS, probabilities(3), None, now, 100)
    capture.answered("penguins", 1.0, variant("1"), RECORDS, probabilities(3), None, now - 3600, 100)
    capture.answered("penguins", 1.0, variant("2", "canary"), RECORDS, probabilities(3), None, now, 100)
    asyncio.run(capture.flush())

    files = sorted(p.relative_to(tmp_path).parts[2:4] for p in tmp_path.glob("penguins/_capture/*/*/*/*.parquet"))
    this_hour, last_hour = hour_of(time.time()), hour_of(time.time() - 3600)
    assert files == sorted([("version=1", f"hour={this_hour}"), ("version=1", f"hour={last_hour}"),
                            ("version=2", f"hour={this_hour}")])
    batch = next(tmp_path.glob("penguins/_capture/version=2/*/*")).name
    stamp, server, seq = batch.split("-")
    assert datetime.strptime(stamp, "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    assert len(server) == 8 and int(server, 16) >= 0 and len(seq) == 6


def test_a_share_samples_about_that_share_and_zero_captures_nothing(tmp_path):
    capture, metrics = make_capture(tmp_path)
    v = variant()
    for share in (0.5, 0.0):
        for _ in range(400):
            capture.answered("penguins", share, v, RECORDS[:1], probabilities(1), None, time.perf_counter(), 50)

    captured = metric(metrics, "kiln_capture_records_total")
    assert 160 < captured < 240


def test_a_full_buffer_drops_new_records_and_counts_them(tmp_path):
    capture, metrics = make_capture(tmp_path, max_rows=10)
    v = variant()

    for _ in range(4):
        capture.answered("penguins", 1.0, v, RECORDS, probabilities(3), None, time.perf_counter(), 100)

    assert metric(metrics, "kiln_capture_records_total") == 9
    assert metric(metrics, "kiln_capture_dropped_total", reason="full") == 3
    assert metric(metrics, "kiln_capture_buffered_records") == 9
    assert metric(metrics, "kiln_capture_oldest_age_seconds") > 0
    asyncio.run(capture.flush())
    assert metric(metrics, "kiln_capture_buffered_records") == 0
    assert metric(metrics, "kiln_capture_oldest_age_seconds") == 0
    capture.answered("penguins", 1.0, v, RECORDS, probabilities(3), None, time.perf_counter(), 100)
    assert metric(metrics, "kiln_capture_records_total") == 12  # room again once written


def test_a_buffer_is_bounded_in_request_bytes_too(tmp_path):
    capture, metrics = make_capture(tmp_path, max_bytes=1000)

    for _ in range(3):
        capture.answered("penguins", 1.0, variant(), RECORDS[:1], probabilities(1), None, time.perf_counter(), 400)

    assert metric(metrics, "kiln_capture_dropped_total", reason="full") == 1


def test_a_failing_flush_drops_its_rows_counts_them_and_the_server_goes_on(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's root should be")
    capture, metrics = make_capture(blocker)

    capture.answered("penguins", 1.0, variant(), RECORDS, probabilities(3), None, time.perf_counter(), 100)
    asyncio.run(capture.flush())

    assert metric(metrics, "kiln_capture_flushes_total", status="failed") == 1
    assert metric(metrics, "kiln_capture_dropped_total", reason="flush_failed") == 3
    assert metric(metrics, "kiln_capture_buffered_records") == 0
    assert "they are dropped" in caplog.text


def test_the_flusher_writes_at_flush_rows_without_waiting_and_the_rest_on_close(tmp_path):
    capture, metrics = make_capture(tmp_path, flush_rows=6, flush_s=3600)
    v = variant()

    async def scenario() -> None:
        capture.start()
        for _ in range(2):
            capture.answered("penguins", 1.0, v, RECORDS, probabilities(3), None, time.perf_counter(), 100)
        deadline = time.monotonic() + 10
        while not list(tmp_path.glob("penguins/_capture/*/*/*/capture.parquet")):
            assert time.monotonic() < deadline, "no flush at flush_rows"
            await asyncio.sleep(0.01)
        capture.answered("penguins", 1.0, v, RECORDS[:1], probabilities(1), None, time.perf_counter(), 100)
        await capture.close()

    asyncio.run(scenario())

    assert read_all(tmp_path, "penguins/_capture/*/*/*/capture.parquet").num_rows == 7
    assert metric(metrics, "kiln_capture_flushes_total", status="ok") == 2


def test_feedback_rows_are_written_with_the_design_columns(tmp_path):
    capture, metrics = make_capture(tmp_path)
    rid = RequestIds(TOKEN).mint()

    assert capture.add_feedback("penguins", rid, [(0, "Adelie"), (1, "Gentoo")], 80)
    assert capture.add_feedback("penguins", rid, [(2, "3.5")], 40)
    asyncio.run(capture.flush())

    table = read_all(tmp_path, f"penguins/_feedback/hour={hour_of(time.time())}/*/feedback.parquet")
    assert table.schema.names == ["request_id", "record", "label", "received_at"]
    assert table.schema.field("record").type == pa.int32()
    assert table.schema.field("received_at").type == pa.timestamp("us", tz="UTC")
    assert [(r["request_id"], r["record"], r["label"]) for r in table.to_pylist()] == [
        (rid, 0, "Adelie"), (rid, 1, "Gentoo"), (rid, 2, "3.5")]


def test_a_full_feedback_buffer_refuses_and_counts(tmp_path):
    capture, metrics = make_capture(tmp_path, max_rows=2)

    assert capture.add_feedback("penguins", "a", [(0, "x"), (1, "y")], 10)
    assert not capture.add_feedback("penguins", "a", [(2, "z")], 10)
    assert metric(metrics, "kiln_capture_dropped_total", reason="feedback_full") == 1


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"request_id": "abc", "labels": ["Adelie", "Gentoo"]}', ("abc", [(0, "Adelie"), (1, "Gentoo")])),
    (b'{"request_id": "abc", "record": 2, "label": "Gentoo"}', ("abc", [(2, "Gentoo")])),
    (b'{"request_id": "abc", "labels": [3.25, 4]}', ("abc", [(0, "3.25"), (1, "4")])),
], ids=["labels", "one_record", "regression_values"])
def test_a_feedback_body_gives_the_id_and_labels(body, expected):
    assert parse_feedback(body, 64) == expected


@pytest.mark.parametrize(("body", "status", "field"), [
    (b"{", 422, "body"),
    (b'{"request_id": "abc"}', 422, "body"),
    (b'{"request_id": "abc", "labels": [], "extra": 1}', 422, "body"),
    (b'{"request_id": "a b", "labels": ["x"]}', 422, "request_id"),
    (b'{"request_id": "abc", "labels": []}', 422, "labels"),
    (b'{"request_id": "abc", "labels": [null]}', 422, "labels[0]"),
    (b'{"request_id": "abc", "labels": ["x", true]}', 422, "labels[1]"),
    (b'{"request_id": "abc", "record": -1, "label": "x"}', 422, "record"),
    (b'{"request_id": "abc", "record": 64, "label": "x"}', 422, "record"),
    (b'{"request_id": "abc", "record": 0, "label": ""}', 422, "label"),
    (b'{"request_id": "abc", "labels": ["x"]' + b', "x": 1}', 422, "body"),
], ids=["bad_json", "no_labels", "unknown_key", "bad_id", "empty_labels", "null_label", "bool_label",
        "negative_record", "record_too_large", "empty_label", "extra_key"])
def test_an_invalid_feedback_body_is_refused_naming_the_field(body, status, field):
    with pytest.raises(RequestError) as caught:
        parse_feedback(body, 64)
    assert caught.value.status == status
    assert caught.value.detail[0]["field"] == field


def test_more_labels_than_max_records_get_413():
    with pytest.raises(RequestError) as caught:
        parse_feedback(b'{"request_id": "abc", "labels": ' + b"[" + b",".join([b'"x"'] * 65) + b"]}", 64)
    assert caught.value.status == 413


def test_keys_follow_the_monitoring_layout():
    assert capture_key("penguins", "3", "2026-12-07T03", "b") == "penguins/_capture/version=3/hour=2026-12-07T03/b"
    assert feedback_key("penguins", "2026-12-07T03", "b") == "penguins/_feedback/hour=2026-12-07T03/b"
    assert hour_of(datetime(2026, 12, 7, 3, 59, 59, tzinfo=UTC).timestamp()) == "2026-12-07T03"


def test_a_deployment_file_without_capture_loads_with_the_default_share():
    old = {"model": "penguins", "champion": {"version": "1", "bundle": "/b"}, "canary": None, "updated_at": ""}

    assert Deployment.from_dict(old).capture == CaptureSettings(DEFAULT_CAPTURE_SHARE) == CaptureSettings(0.1)
    assert Deployment.from_dict({**old, "capture": {"share": 0}}).capture.share == 0
    assert Deployment.from_dict(Deployment.from_dict(old).to_dict()) == Deployment.from_dict(old)


@pytest.mark.parametrize(("capture", "match"), [
    ({"share": 1.5}, "capture.share"), ({"share": "all"}, "capture.share"), ({"share": True}, "capture.share"),
    ({"shares": 0.1}, "capture.shares"), (0.1, "capture must be an object"),
], ids=["over_one", "text", "bool", "unknown_key", "not_an_object"])
def test_an_invalid_capture_section_is_refused_naming_the_field(capture, match):
    data = {"model": "penguins", "champion": {"version": "1", "bundle": "/b"}, "capture": capture}
    with pytest.raises(ValueError, match=match):
        Deployment.from_dict(data)


def test_an_unknown_deployment_field_is_refused_naming_it():
    with pytest.raises(ValueError, match="'captures' is not known"):
        Deployment.from_dict({"model": "penguins", "champion": {"version": "1", "bundle": "/b"}, "captures": {}})


def test_a_server_whose_store_cannot_be_opened_serves_and_counts_its_failed_captures(monkeypatch, caplog):
    """Model servers do not get the platform's S3 secret: with an S3 root and only the key id, opening the store
    fails (botocore: partial credentials). The server must still start; its captures fail, counted."""
    from kiln.tasks.serving.app import ServerState

    monkeypatch.setenv("KILN_ARTIFACT_ROOT", "s3://kiln-captures/root")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    metrics = ServerMetrics()
    state = ServerState("deployment.json", None, metrics, TOKEN, max_batch=8)

    assert "cannot be opened" in caplog.text and "s3://kiln-captures/root" in caplog.text
    state.capture.answered("penguins", 1.0, variant(), RECORDS, probabilities(3), None, time.perf_counter(), 100)
    asyncio.run(state.capture.flush())
    assert metric(metrics, "kiln_capture_flushes_total", status="failed") == 1
    assert metric(metrics, "kiln_capture_dropped_total", reason="flush_failed") == 3
    assert state.monitor.current() is None
