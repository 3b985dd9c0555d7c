"""The monitor report end to end: penguins traffic published in the server's layout, a baseline written and loaded
as the bundle's, and the JSON and HTML a program and a person read: what drifted with its figures, the quality,
an empty window, too little traffic, and the batches skipped."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from monitor_fixtures import (
    INPUTS,
    PIPELINE,
    T0,
    TARGET,
    capture_table,
    feedback_table,
    make_baseline,
    publish,
    publish_capture,
    publish_feedback,
    train_and_live,
)

from kiln.tasks.bundle.baseline import Baseline, BaselineConfig, load_baseline, write_baseline
from kiln.tasks.bundle.files import MANIFEST_FILE
from kiln.tasks.monitoring.drift import DriftThresholds
from kiln.tasks.monitoring.report import REPORT_HTML, REPORT_JSON, MonitorReport, build_report, write_report
from kiln.tasks.monitoring.window import read_captures, read_feedback
from kiln.tasks.storage.artifacts import LocalArtifactStore, file_sha256

HOUR = timedelta(hours=1)
SPECIES = ["Adelie", "Chinstrap", "Gentoo"]
DEFAULT = DriftThresholds()


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "store")


@pytest.fixture
def baseline(tmp_path: Path) -> Baseline:
    """The baseline as register writes it into a bundle and a monitor loads it (hashes checked)."""
    train, _ = train_and_live()
    rows = tmp_path / "snapshot.parquet"
    train.to_parquet(rows, index=False)
    codes = train[TARGET].map(SPECIES.index).to_numpy()
    probabilities = np.full((len(train), 3), 0.05)
    probabilities[np.arange(len(train)), codes] = 0.9
    np.save(tmp_path / "predictions.npy", probabilities)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    write_baseline(BaselineConfig(rows, tmp_path / "predictions.npy", {"accuracy": 0.97, "macro_f1": 0.96},
                                  "accuracy", seed=7), bundle, INPUTS, SPECIES)
    files = {p.name: file_sha256(p) for p in bundle.iterdir()}
    (bundle / MANIFEST_FILE).write_text(json.dumps({"files": files}))
    loaded = load_baseline(bundle)
    assert loaded is not None
    return loaded


def monitor(store: LocalArtifactStore, baseline: Baseline, tmp_path: Path, live: pd.DataFrame | None = None,
            labels: list[str] | None = None) -> tuple[MonitorReport, dict, str]:
    """Publish ``live`` as captured traffic (and ``labels`` as feedback), run the report over the hour, write it."""
    if live is not None:
        table = capture_table(live)
        publish_capture(store, table)
        if labels is not None:
            publish_feedback(store, feedback_table(table, labels))
    report = build_report(PIPELINE, ["v1"], read_captures(store, PIPELINE, ["v1"], T0, T0 + HOUR), baseline,
                          DEFAULT, feedback=read_feedback(store, PIPELINE, T0, T0 + 2 * HOUR))
    json_path, html_path = write_report(report, tmp_path / "report")
    assert (json_path.name, html_path.name) == (REPORT_JSON, REPORT_HTML)
    return report, json.loads(json_path.read_text()), html_path.read_text()


def shifted(live: pd.DataFrame, island: str = "Anvers") -> pd.DataFrame:
    out = live.copy()
    out["body_mass_g"] = out["body_mass_g"] * 1.3
    out.loc[out.index % 3 == 0, "island"] = island
    return out


def test_in_distribution_traffic_reports_no_drift(store: LocalArtifactStore, baseline: Baseline,
                                                  tmp_path: Path) -> None:
    _, live = train_and_live()
    report, doc, page = monitor(store, baseline, tmp_path, live, labels=live[TARGET].tolist())
    assert doc["traffic"] == "ok" and doc["rows"] == 138 and doc["no_traffic"] is False
    assert doc["drifted"] == [] and doc["breached"] is False
    assert list(doc["features"]) == INPUTS and {f["status"] for f in doc["features"].values()} == {"ok"}
    assert doc["prediction"]["status"] == "ok" and doc["prediction"]["column"] == "predicted_class"
    assert doc["quality"]["status"] == "ok" and doc["quality"]["live"] == 1.0
    assert doc["files"] == {"read": 2, "skipped": []}
    assert doc["window"] == {"start": T0.isoformat(), "end": (T0 + HOUR).isoformat()}
    assert "no feature drift" in doc["summary"] and "<h2>Input drift</h2>" in page


def test_heavier_penguins_and_an_unseen_island_drift_on_exactly_those_with_their_figures(
        store: LocalArtifactStore, baseline: Baseline, tmp_path: Path) -> None:
    _, live = train_and_live()
    report, doc, page = monitor(store, baseline, tmp_path, shifted(live))
    assert doc["drifted"] == ["island", "body_mass_g"] and doc["breached"] is True
    mass, island = doc["features"]["body_mass_g"], doc["features"]["island"]
    assert mass["status"] == "drift" and mass["test"] == "ks" and mass["psi"] > 1 and mass["p_value"] < 1e-9
    assert island["status"] == "drift" and island["test"] == "chi-square" and island["psi"] > 1
    assert island["unseen"] == {"Anvers": 46} and island["bins"][-1]["live"] == pytest.approx(46 / 138)
    assert all(f["status"] == "ok" for name, f in doc["features"].items() if name not in ("island", "body_mass_g"))
    assert doc["quality"]["status"] == "not enough labels"  # no feedback sent
    assert "drift on island, body_mass_g" in doc["summary"] and "drift on island, body_mass_g" in page
    assert "&#x27;Anvers&#x27; x46" in page  # the message, escaped, on the verdict's title


def test_labels_showing_worse_accuracy_are_a_quality_breach(store: LocalArtifactStore, baseline: Baseline,
                                                            tmp_path: Path) -> None:
    _, live = train_and_live()
    labels = live[TARGET].tolist()
    labels[:45] = [SPECIES[(SPECIES.index(v) + 1) % 3] for v in labels[:45]]  # a third of the answers wrong
    report, doc, page = monitor(store, baseline, tmp_path, live, labels=labels)
    assert doc["drifted"] == [] and doc["breached"] is True and report.quality.breached
    quality = doc["quality"]
    assert quality["status"] == "breach" and quality["metric"] == "accuracy" and quality["baseline"] == 0.97
    assert quality["live"] == pytest.approx(93 / 138) and quality["drop"] == pytest.approx(0.97 - 93 / 138)
    assert quality["labelled_rows"] == 138
    assert "quality breach: accuracy 0.6739 (test 0.9700)" in doc["summary"] and "breach" in page


def test_an_empty_window_says_no_traffic_and_claims_no_drift(store: LocalArtifactStore, baseline: Baseline,
                                                             tmp_path: Path) -> None:
    report, doc, page = monitor(store, baseline, tmp_path)
    assert doc["no_traffic"] is True and doc["traffic"] == "no traffic" and doc["rows"] == 0
    assert doc["drifted"] == [] and doc["breached"] is False
    assert doc["features"] == {} and doc["prediction"] is None and doc["quality"] is None
    assert doc["summary"] == f"{PIPELINE}: no traffic in the window: no drift claimed"
    assert "No captured traffic in this window" in page


def test_too_little_traffic_gives_no_verdicts(store: LocalArtifactStore, baseline: Baseline,
                                              tmp_path: Path) -> None:
    _, live = train_and_live()
    report, doc, _ = monitor(store, baseline, tmp_path, shifted(live).head(60))
    assert doc["traffic"] == "not enough traffic" and doc["drifted"] == [] and doc["breached"] is False
    assert {f["status"] for f in doc["features"].values()} == {"not enough data"}
    assert "not enough traffic (min_rows 100): no drift verdicts" in doc["summary"]


def test_a_corrupt_batch_and_one_of_an_unknown_version_are_skipped_and_reported(
        store: LocalArtifactStore, baseline: Baseline, tmp_path: Path) -> None:
    _, live = train_and_live()
    corrupt = f"{PIPELINE}/_capture/version=v1/hour=2026-12-07T03/20261207T031500-0a1b2c3d-000009"
    publish(store, corrupt, "capture.parquet", b"PAR1\x00\x01 truncated")
    stranger = publish_capture(store, capture_table(shifted(live), version="v0"), folder_version="v1", seq=8)
    report, doc, page = monitor(store, baseline, tmp_path, live)
    assert doc["rows"] == 138 and doc["drifted"] == []  # the stranger's shifted rows were not counted
    skipped = {s["key"]: s["reason"] for s in doc["files"]["skipped"]}
    assert set(skipped) == {corrupt, stranger} and doc["files"]["read"] == 1
    assert skipped[corrupt].startswith("corrupt capture.parquet")
    assert skipped[stranger] == "its version column holds 'v0', its folder says 'v1'"
    assert "2 batch(es) skipped" in doc["summary"] and "<h2>Skipped batches</h2>" in page and stranger in page


def test_the_page_escapes_what_traffic_sent(store: LocalArtifactStore, baseline: Baseline, tmp_path: Path) -> None:
    _, live = train_and_live()
    _, doc, page = monitor(store, baseline, tmp_path, shifted(live, island="<script>alert(1)</script>"))
    assert doc["features"]["island"]["unseen"] == {"<script>alert(1)</script>": 46}
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_the_report_is_json_safe_with_nothing_but_plain_values(store: LocalArtifactStore, baseline: Baseline,
                                                               tmp_path: Path) -> None:
    _, live = train_and_live()
    report, doc, _ = monitor(store, baseline, tmp_path, shifted(live), labels=live[TARGET].tolist())
    assert json.loads(json.dumps(report.to_dict(), allow_nan=False)) == doc
    assert doc["thresholds"] == {"psi_threshold": 0.2, "p_value": 0.01, "min_rows": 100, "max_metric_drop": 0.05}


def test_a_baseline_made_by_the_fixture_matches_the_bundles(baseline: Baseline, tmp_path: Path) -> None:
    """The drift tests build their baseline without a bundle: it must be the one register writes."""
    train, _ = train_and_live()
    made = make_baseline(tmp_path / "made", train)
    assert made.profile.to_dict()["columns"] == baseline.profile.to_dict()["columns"]
    assert made.predictions["shares"] == pytest.approx(baseline.predictions["shares"])
    assert pq.read_schema(made.sample_path).names == pq.read_schema(baseline.sample_path).names
