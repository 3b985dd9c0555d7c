"""A monitor run on real captured batches in a real local store, against a real bundle baseline and deployment file:
in-distribution traffic is no breach, the issue's shift is a breach naming exactly its features, worse labels are
a quality breach; latest.json (the gauges' contract) and the report are published; retrain requests respect the
cool-down."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
from monitor_fixtures import (
    INPUTS,
    PIPELINE,
    T0,
    TARGET,
    capture_table,
    feedback_table,
    make_baseline,
    publish_capture,
    publish_feedback,
    read_labelled,
    train_and_live,
)

from kiln.tasks.bundle.files import BASELINE_FILE, MANIFEST_FILE
from kiln.tasks.monitoring.drift import DriftThresholds
from kiln.tasks.monitoring.labelled import LABELLED_FILE, labelled_rows
from kiln.tasks.monitoring.report import MonitorReport
from kiln.tasks.monitoring.retrain import load_state, record_request, retrain_key, should_request
from kiln.tasks.monitoring.run import LATEST_FILE, MonitorConfig, latest_key, live_expectations, run_monitor
from kiln.tasks.serving.deployment import Canary, Deployment, ModelRef, write_deployment
from kiln.tasks.serving.monitor_gauges import parse_latest
from kiln.tasks.spec import ExpectationSpec, MonitoringSpec
from kiln.tasks.storage.artifacts import LocalArtifactStore, file_sha256, write_json

NOW = T0 + timedelta(hours=1)
SPECIES = ["Adelie", "Chinstrap", "Gentoo"]


def shifted(live: pd.DataFrame) -> pd.DataFrame:
    """The issue's shift: body_mass_g +30 % and an island the model never saw in a third of the rows."""
    out = live.copy()
    out["body_mass_g"] = out["body_mass_g"] * 1.3
    out.loc[out.index % 3 == 0, "island"] = "Anvers"
    return out


def bundle_folder(folder: Path, with_baseline: bool = True, accuracy: float = 0.97) -> Path:
    """A bundle folder with its baseline (or none) and bundle.json hashes."""
    train, _ = train_and_live()
    folder.mkdir(parents=True)
    if with_baseline:
        b = make_baseline(folder, train, accuracy)
        write_json(folder / BASELINE_FILE, {"format": 1, "profile": b.profile.to_dict(), "predictions": b.predictions,
                                            "metrics": b.metrics, "sample_rows": b.sample_rows,
                                            "created_at": b.created_at})
    write_json(folder / MANIFEST_FILE, {"files": {p.name: file_sha256(p) for p in folder.iterdir()}})
    return folder


def serve(tmp_path: Path, with_baseline: bool = True, canary: Canary | None = None) -> Path:
    """A bundle folder served as champion v1 (and ``canary`` beside it); returns the deployment file."""
    bundle = bundle_folder(tmp_path / "bundle", with_baseline)
    deployment = tmp_path / "serving" / "deployment.json"
    write_deployment(deployment, Deployment(model=PIPELINE, champion=ModelRef("v1", str(bundle)), canary=canary))
    return deployment


def config(deployment: Path, expectations: tuple[ExpectationSpec, ...] = (), **monitoring: object) -> MonitorConfig:
    return MonitorConfig(PIPELINE, MonitoringSpec(**monitoring), "accuracy", deployment, expectations,
                         log_to_mlflow=False, target=TARGET)


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "store")


def latest(store: LocalArtifactStore) -> dict:
    """latest.json as published, checked with the model server's own reader (the gauges' contract)."""
    data = (store.path(latest_key(PIPELINE)) / LATEST_FILE).read_bytes()
    doc = json.loads(data)
    figures = parse_latest(data, PIPELINE)
    assert (figures.breach, figures.rows, set(figures.features)) == (doc["breach"], doc["rows"], set(doc["features"]))
    return doc


def test_in_distribution_traffic_is_no_breach_and_latest_json_is_published(store, tmp_path: Path) -> None:
    publish_capture(store, capture_table(train_and_live()[1]))
    outcome = run_monitor(config(serve(tmp_path)), store, NOW)
    assert (outcome.breach, outcome.action, outcome.retrain_requested) == (False, None, False)
    doc = latest(store)
    assert doc == outcome.latest
    assert {k: doc[k] for k in ("format", "pipeline", "versions", "rows", "no_traffic", "breach", "action",
                                "retrain_requested")} == {
        "format": 1, "pipeline": PIPELINE, "versions": ["v1"], "rows": 138, "no_traffic": False, "breach": False,
        "action": None, "retrain_requested": False}
    assert doc["window"] == {"start": (NOW - timedelta(hours=24)).isoformat(), "end": NOW.isoformat()}
    assert set(doc["features"]) == {"island", "bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g",
                                    "sex", "year"}
    assert not any(f["drift"] for f in doc["features"].values())
    assert all(0 <= f["psi"] < 0.2 for f in doc["features"].values())
    assert doc["predictions"]["drift"] is False and doc["quality"] is None  # no labels came back
    report = store.path(outcome.report_key)
    assert outcome.report_key == f"{PIPELINE}/_monitor/20261207T040000"
    assert json.loads((report / "report.json").read_text())["breached"] is False
    assert "no feature drift" in (report / "report.html").read_text()


def test_shifted_traffic_is_a_breach_on_exactly_those_features_and_requests_a_retrain_once(store,
                                                                                           tmp_path: Path) -> None:
    publish_capture(store, capture_table(shifted(train_and_live()[1])))
    island_in_set = ExpectationSpec(type="expect_column_values_to_be_in_set",
                                    kwargs={"column": "island", "value_set": ["Biscoe", "Dream", "Torgersen"]})
    cfg = config(serve(tmp_path), (island_in_set,), on_breach="retrain")
    outcome = run_monitor(cfg, store, NOW)
    assert (outcome.breach, outcome.action, outcome.retrain_requested) == (True, "retrain", True)
    doc = latest(store)
    assert sorted(f for f, v in doc["features"].items() if v["drift"]) == ["body_mass_g", "island"]
    assert doc["features"]["body_mass_g"]["psi"] >= 0.2 and doc["features"]["body_mass_g"]["p_value"] < 0.01
    assert "drift on island, body_mass_g" in outcome.summary
    report = json.loads((store.path(outcome.report_key) / "report.json").read_text())
    assert report["drifted"] == ["island", "body_mass_g"]
    # The live inputs were checked with the spec's expectations: the unseen island fails the value set.
    assert report["validation"]["success"] is False
    assert [e["unexpected_count"] for e in report["validation"]["expectations"]] == [46]
    assert (store.path(outcome.report_key) / "validation" / "index.html").is_file()
    assert "Live input expectations" in (store.path(outcome.report_key) / "report.html").read_text()
    # The DAG's retrain task records the request; a breach inside the cool-down asks for none.
    record_request(store, PIPELINE, NOW, outcome.summary, outcome.report_key)
    again = run_monitor(cfg, store, NOW + timedelta(hours=2))
    assert (again.breach, again.action, again.retrain_requested) == (True, "retrain", False)
    assert latest(store)["retrain_requested"] is False


def test_worse_labels_are_a_quality_breach_that_only_alerts(store, tmp_path: Path) -> None:
    live = train_and_live()[1]
    table = capture_table(live)
    publish_capture(store, table)
    labels = live["species"].astype(str).tolist()
    labels[:45] = [SPECIES[(SPECIES.index(v) + 1) % 3] for v in labels[:45]]  # a third answered wrong
    publish_feedback(store, feedback_table(table, labels))
    outcome = run_monitor(config(serve(tmp_path)), store, NOW)
    assert (outcome.breach, outcome.action, outcome.retrain_requested) == (True, "alert", False)
    doc = latest(store)
    assert not any(f["drift"] for f in doc["features"].values())
    assert doc["quality"] == {"metric": "accuracy", "live": pytest.approx(1 - 45 / 138), "baseline": 0.97,
                              "breach": True}
    # min_labels above the labelled rows: no verdict, so no breach.
    assert run_monitor(config(serve(tmp_path / "b"), quality={"min_labels": 500}), store, NOW).breach is False


def test_an_empty_window_nothing_served_or_no_baseline_claims_no_drift(store, tmp_path: Path) -> None:
    empty = run_monitor(config(serve(tmp_path / "a")), store, NOW)
    assert (empty.breach, latest(store)["no_traffic"], latest(store)["rows"]) == (False, True, 0)
    assert "no traffic" in empty.summary
    unserved = run_monitor(config(tmp_path / "none" / "deployment.json"), store, NOW)
    assert unserved.breach is False and latest(store)["versions"] == []
    assert "nothing is served" in unserved.notes[0]
    publish_capture(store, capture_table(shifted(train_and_live()[1])))
    old = run_monitor(config(serve(tmp_path / "b", with_baseline=False)), store, NOW)
    assert old.breach is False and latest(store)["features"] == {} and latest(store)["rows"] == 138
    assert "before bundles carried a training baseline" in old.notes[0]
    report = json.loads((store.path(old.report_key) / "report.json").read_text())
    assert report["notes"] == old.notes


def test_the_retrain_cool_down(store) -> None:
    assert should_request(store, PIPELINE, NOW, 24) and load_state(store, PIPELINE) is None
    record_request(store, PIPELINE, NOW, "drift on island")
    assert not should_request(store, PIPELINE, NOW + timedelta(hours=23, minutes=59), 24)
    assert should_request(store, PIPELINE, NOW + timedelta(hours=24), 24)
    assert should_request(store, PIPELINE, NOW, 0)
    # A late retry of an older run does not move the cool-down back.
    assert record_request(store, PIPELINE, NOW - timedelta(hours=5)).requested_at == NOW.isoformat()
    assert load_state(store, PIPELINE).reason == "drift on island"
    with pytest.raises(ValueError, match="no timezone"):
        should_request(store, PIPELINE, NOW.replace(tzinfo=None), 24)
    (store.path(retrain_key(PIPELINE)) / "state.json").write_text('{"requested_at": "yesterday"}')
    with pytest.raises(ValueError, match="is not a retrain state.*delete it"):
        should_request(store, PIPELINE, NOW, 24)


def test_live_expectations_leave_out_the_target_and_the_table_shape(tmp_path: Path) -> None:
    from kiln.tasks.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[2] / "dags" / "pipelines" / "penguins_species.yaml")
    extra = [{"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "species"}},
             {"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": 100}},
             {"type": "expect_column_pair_values_a_to_be_greater_than_b",
              "kwargs": {"column_A": "flipper_length_mm", "column_B": "bill_length_mm"}}]
    data = spec.model_dump(mode="json")
    data["expectations"]["declared"] += extra
    from kiln.tasks.spec import parse_spec

    kept = live_expectations(parse_spec(data, "test"))
    assert [(e.type, e.kwargs.get("column", e.kwargs.get("column_A"))) for e in kept] == [
        ("expect_column_values_to_be_between", "body_mass_g"), ("expect_column_values_to_be_in_set", "island"),
        ("expect_column_pair_values_a_to_be_greater_than_b", "flipper_length_mm")]
    assert MonitorConfig.from_spec(parse_spec(data, "test"), Path("deployment.json")).expectations == kept


def test_append_labelled_exports_the_labelled_rows_received_since_the_last_request(store, tmp_path: Path) -> None:
    live = train_and_live()[1]
    first, second = live.iloc[:60], live.iloc[60:]
    table = capture_table(first)  # received from T0 to T0 + 5 min
    publish_capture(store, table)
    publish_feedback(store, feedback_table(table.slice(0, 40), ["Gentoo"] * 40))  # 40 of 60 labelled
    cfg = config(serve(tmp_path), on_breach="retrain", retrain={"append_labelled": True})
    outcome = run_monitor(cfg, store, NOW)
    assert (outcome.labelled_key, outcome.labelled_rows) == (outcome.report_key, 40)
    assert json.loads(json.dumps(outcome.to_dict())) == outcome.to_dict()  # the XCom
    rows = read_labelled(store.path(outcome.report_key) / LABELLED_FILE)
    expected = first.iloc[:40][INPUTS].reset_index(drop=True).assign(**{TARGET: "Gentoo"})
    expected["year"] = expected["year"].astype(str)  # as captured: the spec declares year categorical
    pd.testing.assert_frame_equal(rows, expected, check_dtype=False)
    assert list(rows.columns) == [*INPUTS, TARGET]  # the inputs and the target; no capture provenance
    report = json.loads((store.path(outcome.report_key) / "report.json").read_text())
    assert report["labelled"] == {"rows": 40, "left_out": 0, "since": None, "file": LABELLED_FILE}
    assert "40 labelled captured rows exported" in outcome.notes[-1]

    # The DAG records the request at T0 + 20 min; the next export holds only rows captured after it.
    requested = T0 + timedelta(minutes=20)
    record_request(store, PIPELINE, requested, outcome.summary, outcome.report_key)
    later = capture_table(second, start=T0 + timedelta(minutes=40), first_request=30)
    publish_capture(store, later, seq=2)
    publish_feedback(store, feedback_table(later.slice(0, 10), ["Adelie"] * 10, T0 + timedelta(minutes=50)), seq=2)
    again = run_monitor(cfg, store, NOW + timedelta(minutes=10))
    assert (again.labelled_key, again.labelled_rows) == (again.report_key, 10)
    rows = read_labelled(store.path(again.report_key) / LABELLED_FILE)
    assert rows[TARGET].tolist() == ["Adelie"] * 10
    assert rows["body_mass_g"].tolist() == second["body_mass_g"].iloc[:10].tolist()
    report = json.loads((store.path(again.report_key) / "report.json").read_text())
    assert report["labelled"]["since"] == requested.isoformat()
    # A run 20 s later, in the same minute, has a folder of its own: it never replaces the labelled file that a
    # retrain queued by the earlier run is about to read.
    soon = run_monitor(cfg, store, NOW + timedelta(minutes=10, seconds=20))
    assert soon.report_key == again.report_key[:-2] + "20" != again.report_key


def test_append_labelled_without_labels_writes_no_file(store, tmp_path: Path) -> None:
    publish_capture(store, capture_table(train_and_live()[1]))
    outcome = run_monitor(config(serve(tmp_path), retrain={"append_labelled": True}), store, NOW)
    assert (outcome.labelled_key, outcome.labelled_rows) == (None, 0)
    assert not (store.path(outcome.report_key) / LABELLED_FILE).exists()
    assert json.loads((store.path(outcome.report_key) / "report.json").read_text())["labelled"]["rows"] == 0
    off = run_monitor(config(serve(tmp_path / "b")), store, NOW + timedelta(minutes=1))  # append_labelled off
    assert json.loads((store.path(off.report_key) / "report.json").read_text())["labelled"] is None
    with pytest.raises(ValueError, match="MonitorConfig.target: monitoring.retrain.append_labelled needs"):
        MonitorConfig(PIPELINE, MonitoringSpec(retrain={"append_labelled": True}), "accuracy", tmp_path / "d.json")


def test_labelled_rows_keep_the_newest_within_the_bound() -> None:
    table = capture_table(train_and_live()[1].iloc[:10])
    rows, left_out = labelled_rows(table.to_pandas(), feedback_table(table, [str(i) for i in range(10)]).to_pandas(),
                                   INPUTS, TARGET, None, max_rows=4)
    assert (rows[TARGET].tolist(), left_out) == (["6", "7", "8", "9"], 6)


def test_a_canary_is_judged_on_its_own_rows_against_its_own_baseline_and_the_champions_live_metric(
        store, tmp_path: Path) -> None:
    champion_rows = train_and_live()[1]
    champion = capture_table(champion_rows)
    publish_capture(store, champion)
    publish_feedback(store, feedback_table(champion, champion_rows["species"].astype(str).tolist()))
    # The canary answered 138 other requests: the shift, and a third of its answers wrong.
    canary_rows = shifted(train_and_live(seed=1)[1])
    canary = capture_table(canary_rows, version="v2", first_request=1000, variant="canary")
    publish_capture(store, canary, version="v2")
    labels = canary_rows["species"].astype(str).tolist()
    labels[:46] = [SPECIES[(SPECIES.index(v) + 1) % 3] for v in labels[:46]]
    publish_feedback(store, feedback_table(canary, labels), seq=2)
    v2 = bundle_folder(tmp_path / "canary_bundle", accuracy=0.96)
    deployment = serve(tmp_path, canary=Canary("v2", str(v2), 0.2))

    outcome = run_monitor(config(deployment, on_breach="retrain"), store, NOW)
    # The champion's figures are its own rows': no drift, its quality intact, so no breach and no retrain.
    assert (outcome.breach, outcome.retrain_requested) == (False, False)
    doc = latest(store)
    assert (doc["versions"], doc["rows"], doc["quality"]["live"]) == (["v1"], 138, 1.0)
    assert not any(f["drift"] for f in doc["features"].values())
    # The canary's: drift on exactly the shifted features, its quality below its test figure and the champion's.
    assert outcome.canary["version"] == "v2" and outcome.canary["breach"] is True
    assert doc["canary"] == {
        "version": "v2", "rows": 138, "drifted": ["island", "body_mass_g"],
        "quality": {"metric": "accuracy", "live": pytest.approx(1 - 46 / 138), "baseline": 0.96, "breach": True},
        "versus_champion": {"metric": "accuracy", "champion": 1.0, "canary": pytest.approx(1 - 46 / 138),
                            "breach": True},
        "breach": True}
    figures = parse_latest(json.dumps(doc).encode(), PIPELINE).canary
    assert (figures.version, figures.rows, figures.breach, figures.metric) == ("v2", 138, True, "accuracy")
    report = json.loads((store.path(outcome.report_key) / "report.json").read_text())
    assert report["breached"] is False and report["canary"]["report"]["versions"] == ["v2"]
    assert report["canary"]["versus_champion"]["drop"] == pytest.approx(46 / 138)
    page = (store.path(outcome.report_key) / "report.html").read_text()
    assert "Canary: version v2 (20% of requests)" in page and "canary (version v2): penguins_species: 138 rows" in page

    # A canary whose bundle has no baseline: its rows are counted, nothing is claimed, no breach.
    old = bundle_folder(tmp_path / "old_bundle", with_baseline=False)
    unjudged = run_monitor(config(serve(tmp_path / "b", canary=Canary("v2", str(old), 0.2))), store,
                           NOW + timedelta(minutes=1))
    assert unjudged.canary["breach"] is False and "before bundles carried a training baseline" in \
        unjudged.canary["summary"]
    assert latest(store)["canary"]["rows"] == 138 and latest(store)["canary"]["versus_champion"] is None


def test_a_canary_as_good_as_the_champion_is_no_breach_and_lower_is_better_metrics_compare_the_right_way() -> None:
    from kiln.tasks.monitoring.canary import judge_canary
    from kiln.tasks.monitoring.quality import Quality

    def report(metric: str, live: float) -> MonitorReport:
        r = MonitorReport(PIPELINE, ["v2"], T0, NOW, 200, DriftThresholds())
        r.quality = Quality("ok", 200, metric, live, live)
        return r

    same = judge_canary("v2", 0.2, report("accuracy", 0.94), Quality("ok", 200, "accuracy", 0.97, 0.95), 0.05)
    assert (same.breached, same.versus.drop) == (False, pytest.approx(0.01))
    rmse = judge_canary("v2", 0.2, report("rmse", 3.0), Quality("ok", 200, "rmse", 2.0, 2.0), 0.5)
    assert (rmse.breached, rmse.versus.drop) == (True, pytest.approx(1.0))
    better = judge_canary("v2", 0.2, report("rmse", 1.0), Quality("ok", 200, "rmse", 2.0, 2.0), 0.5)
    assert (better.breached, better.versus.drop) == (False, pytest.approx(-1.0))
    few = judge_canary("v2", 0.2, report("rmse", 1.0), Quality("not enough labels", 3), 0.5)
    assert few.versus is None and "no head-to-head" in few.note
