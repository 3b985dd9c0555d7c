"""The spec's ``monitoring:`` section: its defaults come from the drift library, and a bad metric, threshold or
choice is refused at parse time naming the field and what is allowed."""

from __future__ import annotations

import pytest

from kiln.tasks.monitoring.drift import DriftThresholds
from kiln.tasks.spec import SpecError, parse_spec

MINIMAL = {"name": "m", "source": {"uri": "/data/x.csv"}, "target": "y", "task": "classification"}


def _parse(monitoring: object, **fields: object):
    return parse_spec({**MINIMAL, **fields, "monitoring": monitoring}, "m.yaml")


def test_defaults_are_the_drift_librarys_and_the_primary_metric() -> None:
    spec = _parse({})
    m = spec.monitoring
    assert (m.schedule, m.window_hours, m.on_breach, m.validate_live) == ("@hourly", 24, "alert", True)
    assert (m.retrain.cooldown_hours, m.retrain.append_labelled) == (24, False)
    assert m.thresholds() == DriftThresholds()
    assert m.quality.min_labels == DriftThresholds().min_rows
    assert spec.quality_metric == "accuracy" and spec.retrain_asset_uri() is None
    assert parse_spec(MINIMAL, "m.yaml").monitoring is None


def test_given_values_reach_the_thresholds_and_retrain_names_its_asset() -> None:
    spec = _parse({"schedule": "0 * * * *", "drift": {"psi_threshold": 0.3, "p_value": 0.001, "min_rows": 50},
                   "quality": {"metric": "rmse", "max_metric_drop": 1.5}, "on_breach": "retrain"},
                  task="regression")
    assert spec.monitoring.thresholds() == DriftThresholds(psi_threshold=0.3, p_value=0.001, min_rows=50,
                                                           max_metric_drop=1.5)
    assert spec.quality_metric == "rmse"
    assert spec.retrain_asset_uri() == "kiln://m/retrain"


def test_append_labelled_is_accepted() -> None:
    spec = _parse({"on_breach": "retrain", "retrain": {"append_labelled": True, "cooldown_hours": 6}})
    assert (spec.monitoring.retrain.append_labelled, spec.monitoring.retrain.cooldown_hours) == (True, 6)


@pytest.mark.parametrize(("monitoring", "expected"), [
    ({"quality": {"metric": "acuracy"}}, ["field 'monitoring.quality.metric'", "unknown metric 'acuracy'",
                                          "allowed: accuracy, macro_f1, roc_auc, log_loss, rmse, mae, r2"]),
    ({"quality": {"metric": "rmse"}}, ["monitoring.quality.metric", "metric 'rmse' is not computed for task "
                                       "'classification'", "allowed: accuracy"]),
    ({"drift": {"psi_threshold": -0.1}}, ["field 'monitoring.drift.psi_threshold'", "must be > 0"]),
    ({"drift": {"p_value": 1.5}}, ["field 'monitoring.drift.p_value'", "must be in (0, 1)"]),
    ({"drift": {"min_rows": 0}}, ["field 'monitoring.drift.min_rows'", "an integer >= 1"]),
    ({"drift": {"psi_treshold": 0.2}}, ["field 'monitoring.drift.psi_treshold'", "did you mean 'psi_threshold'"]),
    ({"quality": {"max_metric_drop": -1}}, ["field 'monitoring.quality.max_metric_drop'", "must be >= 0"]),
    ({"quality": {"min_labels": 0}}, ["field 'monitoring.quality.min_labels'", "integer >= 1"]),
    ({"window_hours": 721}, ["field 'monitoring.window_hours'", "less than or equal to 720"]),
    ({"schedule": "every hour"}, ["field 'monitoring.schedule'", "not a cron expression"]),
    ({"on_breach": "page"}, ["field 'monitoring.on_breach'", "'alert' or 'retrain'"]),
    ({"retrain": {"cooldown_hours": -1}}, ["field 'monitoring.retrain.cooldown_hours'", "greater than or equal"]),
    ({"retrain": {"append_labelled": "sometimes"}}, ["field 'monitoring.retrain.append_labelled'", "boolean"]),
    ({"windw_hours": 2}, ["field 'monitoring.windw_hours'", "did you mean 'window_hours'"]),
], ids=["unknown-metric", "metric-of-another-task", "psi", "p-value", "min-rows", "typo", "metric-drop",
        "min-labels", "window", "cron", "on-breach", "cooldown", "append-labelled", "unknown-field"])
def test_bad_values_are_refused_naming_the_field(monitoring: dict, expected: list[str]) -> None:
    with pytest.raises(SpecError) as raised:
        _parse(monitoring)
    message = str(raised.value)
    for part in expected:
        assert part in message, message
