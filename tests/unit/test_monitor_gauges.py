"""The model server's ``kiln_monitor_*`` gauges: ``latest.json`` files published by hand (the monitor's format 1)
into a real local artifact store, read by the server's reader and rendered by its real metrics registry."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiln.tasks.serving.metrics import ServerMetrics
from kiln.tasks.serving.monitor_gauges import (
    LATEST_FILE,
    LatestFormatError,
    MonitorFiguresReader,
    latest_key,
    parse_latest,
)
from kiln.tasks.storage.artifacts import LocalArtifactStore

PIPELINE = "penguins"
FINISHED = "2026-12-07T03:00:05+00:00"


def latest_doc(**changes: Any) -> dict[str, Any]:
    """A format 1 ``latest.json`` of a run that found ``body_mass_g`` and ``island`` drifted."""
    doc = {"format": 1, "pipeline": PIPELINE,
           "window": {"start": "2026-12-06T03:00:00+00:00", "end": "2026-12-07T03:00:00+00:00"},
           "finished_at": FINISHED, "versions": ["3"], "rows": 1234, "no_traffic": False,
           "features": {"body_mass_g": {"psi": 0.91, "p_value": 1e-30, "drift": True},
                        "island": {"psi": 0.45, "p_value": 1e-12, "drift": True},
                        "bill_length_mm": {"psi": 0.01, "p_value": 0.6, "drift": False}},
           "predictions": {"psi": 0.05, "drift": False},
           "quality": {"metric": "accuracy", "live": 0.9, "baseline": 0.97, "breach": True},
           "breach": True, "action": "retrain", "retrain_requested": True}
    return {**doc, **changes}


def publish(store: LocalArtifactStore, content: dict[str, Any] | bytes, pipeline: str = PIPELINE) -> None:
    """Publish ``latest.json`` as the monitor does (``store.writer``: a new version of the key, atomically)."""
    with store.writer(latest_key(pipeline)) as folder:
        data = content if isinstance(content, bytes) else json.dumps(content).encode()
        (folder / LATEST_FILE).write_bytes(data)


def monitor_samples(metrics: ServerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every ``kiln_monitor_*`` sample of ``/metrics`` as ``{(name, sorted labels): value}``."""
    text = metrics.render().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("kiln_monitor_")}


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def served(store) -> tuple[MonitorFiguresReader, ServerMetrics]:
    """The reader and registry wired as the server wires them."""
    reader, metrics = MonitorFiguresReader(store), ServerMetrics()
    metrics.watch_monitor(reader.current)
    return reader, metrics


def test_the_figures_of_the_latest_run_are_gauges_labelled_with_the_pipeline(store, served):
    reader, metrics = served
    publish(store, latest_doc())

    asyncio.run(reader.refresh(PIPELINE))

    p = ("pipeline", PIPELINE)
    assert monitor_samples(metrics) == {
        ("kiln_monitor_feature_psi", (("feature", "bill_length_mm"), p)): 0.01,
        ("kiln_monitor_feature_psi", (("feature", "body_mass_g"), p)): 0.91,
        ("kiln_monitor_feature_psi", (("feature", "island"), p)): 0.45,
        ("kiln_monitor_feature_drift", (("feature", "bill_length_mm"), p)): 0.0,
        ("kiln_monitor_feature_drift", (("feature", "body_mass_g"), p)): 1.0,
        ("kiln_monitor_feature_drift", (("feature", "island"), p)): 1.0,
        ("kiln_monitor_prediction_psi", (p,)): 0.05,
        ("kiln_monitor_quality_live", (("metric", "accuracy"), p)): 0.9,
        ("kiln_monitor_quality_baseline", (("metric", "accuracy"), p)): 0.97,
        ("kiln_monitor_breach", (p,)): 1.0,
        ("kiln_monitor_rows", (p,)): 1234.0,
        ("kiln_monitor_last_run_timestamp_seconds", (p,)): datetime(2026, 12, 7, 3, 0, 5, tzinfo=UTC).timestamp(),
    }


def test_a_new_run_replaces_the_figures_and_an_unchanged_file_is_not_read_again(store, served, caplog):
    reader, metrics = served
    publish(store, latest_doc())
    caplog.set_level(logging.INFO, logger="kiln.tasks.serving.monitor_gauges")

    for _ in range(3):
        reader.refresh_now(PIPELINE)
    publish(store, latest_doc(breach=False, quality=None, predictions=None, rows=0, no_traffic=True, features={}))
    reader.refresh_now(PIPELINE)

    reads = [r for r in caplog.records if r.getMessage().startswith("monitor figures of")]
    assert len(reads) == 2, "the same file was parsed again on a scrape that found it unchanged"
    samples = monitor_samples(metrics)
    assert {name for name, _ in samples} == {"kiln_monitor_breach", "kiln_monitor_rows",
                                             "kiln_monitor_last_run_timestamp_seconds"}
    assert samples[("kiln_monitor_breach", (("pipeline", PIPELINE),))] == 0.0


def test_before_the_first_run_nothing_is_exposed_and_the_missing_file_is_logged_once(store, served, caplog):
    reader, metrics = served
    caplog.set_level(logging.INFO, logger="kiln.tasks.serving.monitor_gauges")

    for _ in range(3):
        reader.refresh_now(PIPELINE)

    assert monitor_samples(metrics) == {}
    assert "kiln_monitor_" not in metrics.render().decode(), "a family without samples is still named"
    missing = [r for r in caplog.records if "no monitor figures" in r.getMessage()]
    assert len(missing) == 1 and f"{PIPELINE}/_monitor/latest/{LATEST_FILE}" in missing[0].getMessage()


def test_a_damaged_file_removes_the_figures_read_before_and_is_logged_once(store, served, caplog):
    reader, metrics = served
    publish(store, latest_doc())
    reader.refresh_now(PIPELINE)
    assert monitor_samples(metrics)
    caplog.set_level(logging.WARNING, logger="kiln.tasks.serving.monitor_gauges")

    publish(store, b'{"format": 1, "pipeline": "penguins", "rows": ')
    for _ in range(3):
        reader.refresh_now(PIPELINE)

    assert monitor_samples(metrics) == {}
    damaged = [r for r in caplog.records if "damaged monitor figures" in r.getMessage()]
    assert len(damaged) == 1 and "not JSON" in damaged[0].getMessage()


def test_without_a_model_nothing_is_exposed(store, served):
    reader, metrics = served
    publish(store, latest_doc())
    asyncio.run(reader.refresh(PIPELINE))

    asyncio.run(reader.refresh(None))

    assert monitor_samples(metrics) == {}


def test_a_judged_canary_has_gauges_labelled_with_its_version_and_older_files_have_none(store, served):
    reader, metrics = served
    canary = {"version": "4", "rows": 310, "drifted": ["island"],
              "quality": {"metric": "accuracy", "live": 0.8, "baseline": 0.96, "breach": True},
              "versus_champion": {"metric": "accuracy", "champion": 0.95, "canary": 0.8, "breach": True},
              "breach": True}
    publish(store, latest_doc(canary=canary))
    asyncio.run(reader.refresh(PIPELINE))

    p, v = ("pipeline", PIPELINE), ("version", "4")
    samples = monitor_samples(metrics)
    assert {k: value for k, value in samples.items() if k[0].startswith("kiln_monitor_canary_")} == {
        ("kiln_monitor_canary_breach", (p, v)): 1.0,
        ("kiln_monitor_canary_rows", (p, v)): 310.0,
        ("kiln_monitor_canary_quality_live", (("metric", "accuracy"), p, v)): 0.8}
    assert samples[("kiln_monitor_rows", (p,))] == 1234.0  # the champion's figures are unchanged

    publish(store, latest_doc())  # written before canaries were judged: no canary series
    asyncio.run(reader.refresh(PIPELINE))
    assert not any(name.startswith("kiln_monitor_canary_") for name, _ in monitor_samples(metrics))


def test_figures_not_computed_are_left_out_not_shown_as_zero():
    doc = latest_doc(features={"island": {"psi": None, "p_value": None, "drift": False}},
                     quality={"metric": "f1_macro", "live": None, "baseline": 0.95, "breach": False})

    figures = parse_latest(json.dumps(doc).encode(), PIPELINE)
    metrics = ServerMetrics()
    metrics.watch_monitor(lambda: figures)

    names = {name for name, _ in monitor_samples(metrics)}
    assert "kiln_monitor_feature_psi" not in names and "kiln_monitor_quality_live" not in names
    assert {"kiln_monitor_feature_drift", "kiln_monitor_quality_baseline"} <= names


@pytest.mark.parametrize(("changes", "message"), [
    ({"format": 2}, "format: expected 1"),
    ({"pipeline": "other"}, "pipeline: the file names 'other'"),
    ({"rows": -1}, "rows: expected a count"),
    ({"rows": "many"}, "rows: expected int"),
    ({"breach": 1}, "breach: expected bool"),
    ({"finished_at": "yesterday"}, "finished_at: not an ISO 8601 time"),
    ({"finished_at": None}, "finished_at: expected str"),
    ({"features": {"island": {"psi": "high", "drift": True}}}, "features.island.psi: expected int or float or null"),
    ({"features": {"island": {"psi": True, "drift": True}}}, "features.island.psi: expected int or float or null"),
    ({"features": {"island": {"psi": 0.3}}}, "features.island.drift: expected bool"),
    ({"features": {"island": 0.3}}, "features.island: expected an object"),
    ({"quality": {"live": 0.9}}, "quality.metric: expected str"),
    ({"features": {f"f{i}": {"psi": 0.1, "drift": False} for i in range(2001)}}, "at most 2000 are exposed"),
    ({"canary": {"version": "4", "rows": 10}}, "canary.breach: expected bool"),
    ({"canary": {"version": 4, "rows": 10, "breach": True}}, "canary.version: expected str"),
    ({"canary": {"version": "4", "rows": -2, "breach": True}}, "canary.rows: expected a count"),
    ({"canary": "4"}, "canary: expected dict or null"),
], ids=["format", "pipeline", "negative-rows", "rows-text", "breach-number", "time-text", "time-missing",
        "psi-text", "psi-flag", "drift-missing", "feature-number", "quality-metric-missing", "too-many-features",
        "canary-breach-missing", "canary-version-number", "canary-negative-rows", "canary-text"])
def test_a_file_not_in_format_1_is_refused_naming_the_field(changes, message):
    with pytest.raises(LatestFormatError, match=message.replace("(", r"\(")):
        parse_latest(json.dumps(latest_doc(**changes)).encode(), PIPELINE)


@pytest.mark.parametrize("data", [b"\xff\xfe", b"[1, 2]", b"nul"], ids=["bytes", "array", "truncated"])
def test_bytes_that_are_not_a_json_object_are_refused(data):
    with pytest.raises(LatestFormatError):
        parse_latest(data, PIPELINE)
