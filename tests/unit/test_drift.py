"""Drift and quality against the training baseline: real penguins traffic does not alarm, the issue's shift alarms on
exactly the shifted features with their figures, and each verdict needs both a large PSI and a small p-value."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from monitor_fixtures import INPUTS, NUMERIC, capture_table, make_baseline, train_and_live

from kiln.tasks.bundle.baseline import Baseline
from kiln.tasks.features.profile import ColumnProfile, DataProfile, profile_parquet
from kiln.tasks.monitoring.drift import (
    RARE,
    UNSEEN,
    DriftThresholds,
    categorical_drift,
    feature_drift,
    numeric_drift,
    prediction_drift,
    psi,
)
from kiln.tasks.monitoring.quality import live_quality

DEFAULT = DriftThresholds()


def traffic(tmp_path: Path, seed: int = 0):
    train, live = train_and_live(seed)
    baseline = make_baseline(tmp_path / "bundle", train)
    return baseline, pd.read_parquet(baseline.sample_path), capture_table(live).to_pandas()


def shifted(frame: pd.DataFrame) -> pd.DataFrame:
    """The issue's shift: body_mass_g +30 % and an island the model never saw in a third of the rows."""
    out = frame.copy()
    out["body_mass_g"] = out["body_mass_g"] * 1.3
    out.loc[out.index % 3 == 0, "island"] = "Anvers"
    return out


@pytest.mark.parametrize("seed", range(5), ids=[f"split{s}" for s in range(5)])
def test_unseen_rows_of_the_training_population_do_not_drift(tmp_path: Path, seed: int) -> None:
    baseline, sample, live = traffic(tmp_path, seed)
    result = {f.column: f for f in feature_drift(baseline.profile, sample, live, DEFAULT)}
    assert list(result) == INPUTS
    assert [f.column for f in result.values() if f.drifted] == []
    for name, figures in result.items():
        assert figures.status == "ok" and figures.psi is not None and figures.p_value is not None, name
        assert figures.test == ("ks" if name in NUMERIC or name == "year" else "chi-square"), name
        assert len(figures.bins) >= 3 and abs(sum(b["live"] for b in figures.bins) - 1) < 1e-9
    assert not prediction_drift(baseline.predictions, live, DEFAULT).drifted


def test_heavier_penguins_and_an_unseen_island_drift_on_exactly_those_features(tmp_path: Path) -> None:
    baseline, sample, live = traffic(tmp_path)
    result = {f.column: f for f in feature_drift(baseline.profile, sample, shifted(live), DEFAULT)}
    assert [name for name, f in result.items() if f.drifted] == ["island", "body_mass_g"]
    mass, island = result["body_mass_g"], result["island"]
    assert mass.test == "ks" and mass.psi > 1.0 and mass.p_value < 1e-9 and mass.statistic > 0.4
    # Training's heaviest decile now holds most of the traffic: the page shows where it moved.
    assert mass.bins[-1]["baseline"] == pytest.approx(0.1, abs=0.02) and mass.bins[-1]["live"] > 0.4
    assert island.test == "chi-square" and island.psi > 1.0 and island.p_value < 1e-9
    assert island.unseen == {"Anvers": 46}
    assert island.bins[-1] == {"bin": UNSEEN, "baseline": pytest.approx(1e-3, rel=0.01),
                               "live": pytest.approx(46 / 138)}
    assert "'Anvers' x46" in island.message and "PSI" in island.message
    # The answers did not move (the predicted class is the species): no prediction drift either.
    assert not prediction_drift(baseline.predictions, shifted(live), DEFAULT).drifted


def test_a_drift_needs_both_a_large_psi_and_a_small_p_value() -> None:
    rng = np.random.default_rng(1)
    base = pd.Series(rng.normal(0, 1, 5000))
    profile_column = ColumnProfile("numeric", "double", 0, 1.0)
    # A million-row window shifted by 0.08 sd: the KS test calls it real, PSI calls it negligible.
    tiny = numeric_drift("x", profile_column, 0.0, pd.Series(rng.normal(0.08, 1, 1_000_000)), base, DEFAULT)
    assert tiny.p_value < 1e-3 and tiny.psi < 0.02 and tiny.status == "ok"
    # Eight rows: empty deciles make PSI large, the test says it is chance.
    few = numeric_drift("x", profile_column, 0.0, pd.Series(rng.normal(0, 1, 8)), base,
                        DriftThresholds(min_rows=5))
    assert few.psi > 0.5 and few.p_value > 0.01 and few.status == "ok"


def test_too_few_values_give_figures_of_missingness_but_no_verdict(tmp_path: Path) -> None:
    baseline, sample, live = traffic(tmp_path)
    result = feature_drift(baseline.profile, sample, shifted(live).head(40), DEFAULT)
    assert {f.status for f in result} == {"not enough data"}
    assert all(f.psi is None and f.p_value is None and f.rows <= 40 for f in result)
    assert "fewer than min_rows 100" in result[0].message
    assert prediction_drift(baseline.predictions, live.head(40), DEFAULT).status == "not enough data"


def test_without_a_sample_numeric_columns_use_the_profile_quantiles_and_a_chi_square(tmp_path: Path) -> None:
    baseline, _, live = traffic(tmp_path)
    calm = {f.column: f for f in feature_drift(baseline.profile, None, live, DEFAULT)}
    moved = {f.column: f for f in feature_drift(baseline.profile, None, shifted(live), DEFAULT)}
    assert calm["body_mass_g"].test == "chi-square" and not calm["body_mass_g"].drifted
    assert [n for n, f in moved.items() if f.drifted] == ["island", "body_mass_g"]


def test_missing_shares_and_a_column_absent_from_traffic_are_reported(tmp_path: Path) -> None:
    baseline, sample, live = traffic(tmp_path)
    live.loc[: len(live) // 2, "sex"] = None
    result = {f.column: f for f in feature_drift(baseline.profile, sample, live.drop(columns=["year"]), DEFAULT)}
    assert result["year"].status == "not in traffic" and result["year"].psi is None
    assert result["sex"].missing_share > 0.5
    assert result["sex"].baseline_missing_share == pytest.approx(baseline.profile.missing_share("sex"))


@pytest.mark.parametrize(("complete", "drifts"), [(True, True), (False, False)],
                         ids=["all-values-listed-new-value-drifts", "unlisted-values-count-as-rare"])
def test_values_the_profile_did_not_list_are_rare_not_unseen(complete: bool, drifts: bool) -> None:
    column = ColumnProfile("categorical", "string", 0, 0.0, categories={"a": 500, "b": 400} if not complete else
                           {"a": 500, "b": 400, "c": 100}, other=0 if complete else 100, complete=complete)
    live = pd.Series(["a"] * 500 + ["b"] * 400 + ["zzz"] * 100)
    result = categorical_drift("code", column, 0.0, live, DEFAULT)
    assert result.drifted is drifts
    assert result.unseen == {"zzz": 100}
    labels = [b["bin"] for b in result.bins]
    assert (RARE in labels) is not complete and labels[-1] == UNSEEN


def test_regression_predictions_drift_on_their_deciles() -> None:
    rng = np.random.default_rng(3)
    values = rng.normal(100, 10, 5000)
    baseline = {"kind": "numeric", "quantiles": np.quantile(values, np.linspace(0, 1, 11)).tolist(),
                "mean": float(values.mean())}
    same = prediction_drift(baseline, pd.DataFrame({"predicted_value": rng.normal(100, 10, 500)}), DEFAULT)
    moved = prediction_drift(baseline, pd.DataFrame({"predicted_value": rng.normal(115, 10, 500)}), DEFAULT)
    assert (same.status, moved.status) == ("ok", "drift")
    assert moved.column == "predicted_value" and moved.test == "chi-square" and moved.psi > 1


def test_psi_of_equal_shares_is_zero_and_an_empty_bin_costs_a_finite_amount() -> None:
    assert psi(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0
    assert 0.5 < psi(np.array([0.5, 0.5]), np.array([1.0, 0.0])) < 10


def labelled(tmp_path: Path, wrong_share: float, rows: int | None = None) -> tuple[pd.DataFrame, Baseline]:
    """Captured rows with labels, of which ``wrong_share`` name another species than the answer."""
    baseline, _, live = traffic(tmp_path)
    species = sorted(baseline.predictions["shares"])
    labels = live["predicted_class"].astype(str).tolist()
    wrong = int(len(labels) * wrong_share)
    labels[:wrong] = [species[(species.index(v) + 1) % 3] for v in labels[:wrong]]
    live["label"] = labels
    return (live if rows is None else live.head(rows)), baseline


def test_labels_showing_worse_accuracy_are_a_quality_breach(tmp_path: Path) -> None:
    live, baseline = labelled(tmp_path, wrong_share=0.3)
    quality = live_quality(live, baseline.predictions, baseline.metrics, DEFAULT)
    assert quality.status == "breach" and quality.breached
    assert quality.metric == "accuracy" and quality.baseline == 0.97 and quality.labelled_rows == 138
    assert quality.live == pytest.approx(1 - int(138 * 0.3) / 138)
    assert quality.drop == pytest.approx(0.97 - quality.live)
    # Three classes: only the predicted class's metrics are exact from a captured row.
    assert set(quality.metrics) == {"accuracy", "macro_f1"}
    assert "breach" in quality.message and "max_metric_drop 0.05" in quality.message


@pytest.mark.parametrize(("wrong_share", "rows", "status"), [(0.02, None, "ok"), (0.3, 60, "not enough labels")],
                         ids=["within-the-drop", "too-few-labels"])
def test_quality_needs_a_real_fall_over_enough_labels(tmp_path: Path, wrong_share: float, rows: int | None,
                                                      status: str) -> None:
    live, baseline = labelled(tmp_path, wrong_share, rows)
    assert live_quality(live, baseline.predictions, baseline.metrics, DEFAULT).status == status


def test_quality_of_a_regression_model_falls_in_the_metrics_direction() -> None:
    rng = np.random.default_rng(5)
    truth = rng.normal(50, 5, 300)
    rows = pd.DataFrame({"predicted_value": truth + rng.normal(0, 1, 300), "label": [f"{v:.4f}" for v in truth]})
    metrics = {"primary": "rmse", "value": 0.9, "all": {"rmse": 0.9}}
    predictions = {"kind": "numeric", "quantiles": list(range(11)), "mean": 5.0}
    ok = live_quality(rows, predictions, metrics, DriftThresholds(max_metric_drop=0.5))
    rows["predicted_value"] += 3
    worse = live_quality(rows, predictions, metrics, DriftThresholds(max_metric_drop=0.5))
    assert ok.status == "ok" and worse.status == "breach" and worse.drop == pytest.approx(worse.live - 0.9)


def test_two_classes_keep_every_metric_and_an_unknown_primary_is_not_computable(tmp_path: Path) -> None:
    rows = pd.DataFrame({"predicted_class": ["yes", "no"] * 60, "predicted_value": [0.8] * 120,
                         "label": ["yes", "no"] * 50 + ["no", "yes"] * 10})
    predictions = {"kind": "classes", "shares": {"no": 0.5, "yes": 0.5}}
    quality = live_quality(rows, predictions, {"primary": "roc_auc", "value": 0.95}, DEFAULT)
    assert set(quality.metrics) == {"accuracy", "macro_f1", "log_loss", "roc_auc"}
    assert quality.status == "breach" and quality.live == pytest.approx(100 / 120)
    three = pd.concat([rows, rows.assign(predicted_class="maybe", label="maybe")])
    assert live_quality(three, predictions, {"primary": "log_loss", "value": 0.2}, DEFAULT).status == "not computable"


@pytest.mark.parametrize(("field", "value"), [("psi_threshold", 0), ("p_value", 1.5), ("min_rows", 0),
                                              ("max_metric_drop", -0.1)])
def test_thresholds_out_of_bounds_are_refused_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        DriftThresholds(**{field: value})


def test_the_profile_of_the_baseline_sample_is_what_register_writes(tmp_path: Path) -> None:
    """The fixture's baseline is built as the bundle's is: the raw inputs, profiled by profile_parquet."""
    baseline, sample, _ = traffic(tmp_path)
    assert list(sample.columns) == INPUTS
    assert isinstance(baseline.profile, DataProfile)
    assert baseline.profile.to_dict() == profile_parquet(baseline.sample_path).to_dict()
    assert baseline.profile.columns["year"].kind == "numeric"  # captured as text, compared as numbers
