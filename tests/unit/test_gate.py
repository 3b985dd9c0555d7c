"""Unit tests for the gate's decision: thresholds, the champion comparison, the bootstrap bounds and slices."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pandas as pd
import pytest

from kiln.tasks.evaluation.gate_rules import GateConfig, GateDecision, _bound_of, decide
from kiln.tasks.evaluation.metrics import compute_metrics
from kiln.tasks.evaluation.resampling import resampled_metrics
from kiln.tasks.spec import EvaluationSpec, GateSpec, SliceSpec


def gate_config(task: str = "classification", primary_metric: str = "accuracy", thresholds: dict | None = None,
                seed: int = 0, **rules) -> GateConfig:
    """A config whose ``evaluation.gate`` rules are ``rules`` (validated by the spec, as in a pipeline)."""
    return GateConfig(task=task, primary_metric=primary_metric, thresholds=thresholds or {}, seed=seed,
                      rules=GateSpec(**rules))


def _classifier(y: np.ndarray, wrong, k: int = 2, confidence: float = 0.8) -> np.ndarray:
    """Probabilities that pick the true class except on the rows in ``wrong``."""
    y = np.asarray(y)
    predicted = y.copy()
    predicted[wrong] = (y[wrong] + 1) % k
    probs = np.full((len(y), k), (1 - confidence) / (k - 1))
    probs[np.arange(len(y)), predicted] = confidence
    return probs


Y_CLF = np.arange(20) % 2
Y_REG = np.arange(10, dtype=np.float64)


def _predictions(task: str, quality: float | None) -> np.ndarray | None:
    """Classification: ``quality`` rows of ``Y_CLF`` wrong. Regression: every error is +-``quality``."""
    if quality is None:
        return None
    if task == "classification":
        return _classifier(Y_CLF, np.arange(int(quality)))
    return Y_REG + quality * np.where(np.arange(len(Y_REG)) % 2 == 0, 1.0, -1.0)


def _check(decision: GateDecision, kind: str) -> dict:
    (found,) = [c for c in decision.checks if c["kind"] == kind]
    return found


@pytest.mark.parametrize(("task", "config", "candidate", "champion", "passed", "reason", "champion_diff"), [
    ("classification", {"thresholds": {"accuracy": 0.8}}, 2, None, True,
     "passed: first model (no champion); thresholds met (accuracy 0.9 ≥ 0.8)", None),
    ("classification", {"thresholds": {"accuracy": 0.8}}, 10, None, False,
     "failed: accuracy 0.5 below threshold 0.8", None),
    ("classification", {"thresholds": {"accuracy": 0.8}}, 2, 6, True,
     "passed: thresholds met (accuracy 0.9 ≥ 0.8) and beats champion on accuracy (0.9 vs 0.7, margin 0)", 0.2),
    ("classification", {"margin": 0.05}, 6, 2, False,
     "failed: accuracy 0.7 trails champion 0.9 by more than margin 0.05", -0.2),
    # 0.85 - 0.9 is -0.05000000000000004 in floats: a tie exactly at the margin still passes
    ("classification", {"margin": 0.05}, 3, 2, True,
     "passed: no thresholds set and is within margin of champion on accuracy (0.85 vs 0.9, margin 0.05)", -0.05),
    ("regression", {"thresholds": {"rmse": 1.5}}, 1.0, 2.0, True,
     "passed: thresholds met (rmse 1 ≤ 1.5) and beats champion on rmse (1 vs 2, margin 0)", 1.0),
    ("regression", {"thresholds": {"rmse": 1.5}, "margin": 0.5}, 2.0, 1.0, False,
     "failed: rmse 2 above threshold 1.5; rmse 2 trails champion 1 by more than margin 0.5", -1.0),
    ("regression", {"margin": 0.5}, 1.25, 1.0, True,
     "passed: no thresholds set and is within margin of champion on rmse (1.25 vs 1, margin 0.5)", -0.25),
], ids=["first_model_passes_on_thresholds", "first_model_fails_threshold", "better_candidate_passes",
        "worse_beyond_margin_fails", "tie_within_margin_passes", "rmse_lower_is_better_passes",
        "rmse_higher_fails_threshold_and_champion", "rmse_within_margin_passes"])
def test_point_decision(task, config, candidate, champion, passed, reason, champion_diff):
    cfg = gate_config(task=task, primary_metric="accuracy" if task == "classification" else "rmse", **config)
    y = Y_CLF if task == "classification" else Y_REG

    decision = decide(cfg, y, _predictions(task, candidate), _predictions(task, champion),
                      2 if task == "classification" else None)

    assert (decision.passed, decision.reason) == (passed, reason)
    champion_check = _check(decision, "champion")
    assert champion_check["skipped"] is (champion is None)
    if champion_diff is not None:  # positive = the candidate is better, whichever the metric's direction
        assert champion_check["value"] == pytest.approx(champion_diff)
    assert (decision.champion_metrics is None) is (champion is None)


def test_decision_is_json_ready_and_logged_one_line_per_check(caplog):
    cfg = gate_config(task="classification", primary_metric="accuracy", thresholds={"accuracy": 0.8, "log_loss": 1.0})
    caplog.set_level(logging.INFO, logger="kiln.tasks.evaluation.gate_rules")

    decision = decide(cfg, Y_CLF.astype(np.int64), _predictions("classification", 2).astype(np.float32),
                      _predictions("classification", 4), 2)

    record = json.loads(json.dumps(decision.to_dict(), allow_nan=False))
    assert record["passed"] is True and record["method"] == "point"
    assert [c["name"] for c in record["checks"]] == ["threshold accuracy", "threshold log_loss", "champion accuracy"]
    assert all(type(v) is float for v in record["candidate_metrics"].values())
    check_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("gate check")]
    assert len(check_lines) == 3 and "threshold log_loss [passed]" in check_lines[1]


def test_threshold_on_a_metric_the_model_does_not_have_fails_with_the_reason():
    y = np.arange(12) % 3
    cfg = gate_config(task="classification", primary_metric="accuracy", thresholds={"roc_auc": 0.7})

    decision = decide(cfg, y, _classifier(y, [], k=3), None, 3)

    assert not decision.passed
    assert decision.reason == ("failed: roc_auc was not computed: it is defined for two classes only "
                               "(this model has 3)")


def _noisy_classifier(y: np.ndarray, accuracy: float, rng: np.random.Generator) -> np.ndarray:
    wrong = rng.choice(len(y), size=round(len(y) * (1 - accuracy)), replace=False)
    return _classifier(y, wrong, confidence=float(rng.uniform(0.6, 0.9)))


def test_bootstrap_passes_a_clearly_better_candidate():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 400)
    cfg = gate_config(task="classification", primary_metric="accuracy", thresholds={"accuracy": 0.8},
                     method="bootstrap", bootstrap_samples=500)

    decision = decide(cfg, y, _noisy_classifier(y, 0.9, rng), _noisy_classifier(y, 0.6, rng), 2)

    assert decision.passed, decision.reason
    champion = _check(decision, "champion")
    assert 0 < champion["bound"] < champion["value"]
    threshold = _check(decision, "threshold")
    assert 0.8 < threshold["bound"] < threshold["value"]  # a lower bound for a higher-is-better metric
    assert "95% lower bound of the difference +" in decision.reason and "500 of 500 resamples" in decision.reason


def test_bootstrap_fails_a_marginal_win_on_a_tiny_test_set_that_the_point_check_passes():
    y = Y_CLF
    candidate = _classifier(y, [0, 1, 2, 3, 4])  # 15 of 20 right
    champion = _classifier(y, [3, 4, 5, 6, 7, 8])  # 14 of 20 right, wrong on different rows

    point = decide(gate_config(task="classification", primary_metric="accuracy"), y, candidate, champion, 2)
    boot = decide(gate_config(task="classification", primary_metric="accuracy", method="bootstrap"), y, candidate,
                  champion, 2)

    assert point.passed and "beats champion on accuracy (0.75 vs 0.7, margin 0)" in point.reason
    assert not boot.passed
    assert boot.reason.startswith("failed: accuracy vs champion (0.75 vs 0.7, margin 0): 95% lower bound of the "
                                  "difference -")
    point_check, boot_check = _check(point, "champion"), _check(boot, "champion")
    assert point_check["value"] == boot_check["value"] == pytest.approx(0.05)
    assert point_check["bound"] is None and boot_check["bound"] < 0


def test_bootstrap_uses_the_upper_bound_for_an_error_metric():
    rng = np.random.default_rng(3)
    y = rng.normal(size=200)
    pred = y + rng.normal(scale=0.5, size=200)
    threshold = compute_metrics("regression", y, pred, None)["rmse"] + 0.01
    cfg = gate_config(task="regression", primary_metric="rmse", thresholds={"rmse": threshold}, method="bootstrap")

    decision = decide(cfg, y, pred, None, None)

    check = _check(decision, "threshold")
    assert check["value"] < threshold < check["bound"]  # the point estimate passes, the 95% upper bound does not
    assert not decision.passed and "rmse 95% upper bound" in decision.reason


def test_bootstrap_is_deterministic_for_a_seed():
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 300)
    candidate, champion = _noisy_classifier(y, 0.8, rng), _noisy_classifier(y, 0.75, rng)

    def run(seed: int) -> dict:
        cfg = gate_config(task="classification", primary_metric="log_loss", thresholds={"log_loss": 1.0},
                         method="bootstrap", seed=seed)
        return decide(cfg, y, candidate, champion, 2).to_dict()

    first, again, other = run(0), run(0), run(1)

    assert first == again
    assert [c["bound"] for c in first["checks"]] != [c["bound"] for c in other["checks"]]


def test_bootstrap_drops_resamples_where_the_metric_is_undefined():
    y = np.array([1] + [0] * 9)  # a resample misses the positive row about a third of the time
    cfg = gate_config(task="classification", primary_metric="roc_auc", thresholds={"roc_auc": 0.1},
                     method="bootstrap")

    decision = decide(cfg, y, _classifier(y, [5]), None, 2)

    found = re.search(r"\(point 0.9444; (\d+) of 1000 resamples\)", decision.checks[0]["detail"])
    assert found and 500 < int(found.group(1)) < 1000


def test_too_few_defined_resamples_give_no_bound():
    # Real test sets reach this only by chance (every metric here is defined on at least half the resamples
    # of any set of two or more rows that defines it), so the rule is tested on the values directly.
    cfg = gate_config(task="classification", primary_metric="roc_auc", method="bootstrap", bootstrap_samples=100)
    samples = np.r_[np.full(51, np.nan), np.linspace(0.6, 0.9, 49)]

    bound, used = _bound_of(samples, True, cfg)

    assert bound is None and used.startswith("49 of 100 resamples define it, fewer than 50%")


@pytest.mark.parametrize(("task", "k"), [("classification", 2), ("classification", 4), ("regression", None)],
                         ids=["binary", "multiclass", "regression"])
def test_resampled_metrics_equal_compute_metrics_on_the_drawn_rows(task, k):
    rng = np.random.default_rng(5)
    n = 60
    if task == "classification":
        y = rng.integers(0, k, n)
        pred = rng.dirichlet(np.ones(k), n).round(1) + 1e-3  # rounding makes tied scores for the AUC
        pred /= pred.sum(axis=1, keepdims=True)
    else:
        y, pred = rng.normal(size=n), rng.normal(size=n)
    draws = rng.integers(0, n, size=(4, n))
    counts = np.stack([np.bincount(d, minlength=n) for d in draws])

    expected = [compute_metrics(task, y[d], pred[d], k) for d in draws]
    got = resampled_metrics(task, y, pred, k, counts, list(expected[0]))

    for i, metrics in enumerate(expected):
        assert {m: got[m][i] for m in metrics} == pytest.approx(metrics, rel=1e-9)


REGIONS = ["north"] * 30 + ["south"] * 30 + ["east"] * 5 + [None] * 25


def _slice_frame() -> pd.DataFrame:
    return pd.DataFrame({"region": REGIONS, "size": np.arange(len(REGIONS))})


def test_one_bad_slice_fails_the_gate_and_is_named():
    y = np.arange(len(REGIONS)) % 2
    candidate = _classifier(y, np.arange(30, 45))  # half of the south rows wrong, all others right
    cfg = gate_config(task="classification", primary_metric="accuracy", thresholds={"accuracy": 0.8},
                     slices=[SliceSpec(column="region", thresholds={"accuracy": 0.8})])

    decision = decide(cfg, y, candidate, None, 2, _slice_frame())

    assert not decision.passed
    assert decision.reason == "failed: slice region=south: accuracy 0.5 below threshold 0.8"
    slices = {c["name"]: c for c in decision.checks if c["kind"] == "slice"}
    assert slices["slice region=east"]["skipped"] and slices["slice region=east"]["passed"]
    assert "5 rows < min_rows 20" in slices["slice region=east"]["detail"]
    assert slices["slice region=null accuracy"]["passed"] and slices["slice region=north accuracy"]["passed"]


def test_slice_regression_against_the_champion_fails_although_the_candidate_wins_overall():
    y = np.arange(len(REGIONS)) % 2
    candidate = _classifier(y, np.arange(30, 36))  # 6 south rows wrong: 0.933 overall, 0.8 on south
    champion = _classifier(y, np.r_[0:10, 65:75])  # perfect on south, 20 wrong elsewhere
    cfg = gate_config(task="classification", primary_metric="accuracy",
                     slices=[SliceSpec(column="region", min_rows=10, max_regression=0.1)])

    decision = decide(cfg, y, candidate, champion, 2, _slice_frame())

    assert not decision.passed
    assert decision.reason == "failed: slice region=south: accuracy 0.8 trails champion 1 by more than " \
                              "max_regression 0.1"
    assert _check(decision, "champion")["passed"]


def test_small_slices_are_skipped_and_the_gate_passes():
    y = np.arange(len(REGIONS)) % 2
    cfg = gate_config(task="classification", primary_metric="accuracy",
                     slices=[SliceSpec(column="region", min_rows=26, thresholds={"accuracy": 0.9}, max_regression=0.0)])

    decision = decide(cfg, y, _classifier(y, []), _classifier(y, []), 2, _slice_frame())

    assert decision.passed
    skipped = sorted(c["name"] for c in decision.checks if c["skipped"])
    assert skipped == ["slice region=east", "slice region=null"]
    assert decision.reason.endswith("; 4 slice checks passed, 2 skipped")


@pytest.mark.parametrize(("frame", "match"), [
    (pd.DataFrame({"region": REGIONS, "size": 0}), r"slice column 'segment' is not in slice_frame; present: "
                                                   r"region, size"),
    (None, "no slice_frame was given"),
    (pd.DataFrame({"segment": REGIONS[:10]}), "slice_frame has 10 rows but y_true has 90"),
], ids=["missing_column", "no_frame", "row_count_mismatch"])
def test_slice_frame_errors(frame, match):
    y = np.arange(len(REGIONS)) % 2
    cfg = gate_config(task="classification", primary_metric="accuracy",
                     slices=[SliceSpec(column="segment", thresholds={"accuracy": 0.5})])

    with pytest.raises(ValueError, match=match):
        decide(cfg, y, _classifier(y, []), None, 2, frame)


def test_a_continuous_slice_column_is_rejected():
    y = np.arange(300) % 2
    cfg = gate_config(task="classification", primary_metric="accuracy",
                     slices=[SliceSpec(column="size", thresholds={"accuracy": 0.5})])

    with pytest.raises(ValueError, match="'size' has 300 distinct values"):
        decide(cfg, y, _classifier(y, []), None, 2, pd.DataFrame({"size": np.arange(300) * 0.5}))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"task": "ranking"}, "GateConfig.task"),
    ({"primary_metric": "rmse"}, "GateConfig: metric 'rmse' is not computed for task 'classification'"),
    ({"thresholds": {"r2": 0.5}}, "GateConfig: metric 'r2'"),
    ({"slices": [SliceSpec(column="a", thresholds={"mae": 1.0})]}, "GateConfig: metric 'mae'"),
], ids=["task", "primary_metric", "threshold_metric", "slice_metric"])
def test_gate_config_errors_name_the_metric(kwargs, match):
    rules = {"slices": kwargs.pop("slices")} if "slices" in kwargs else {}
    with pytest.raises(ValueError, match=match):
        gate_config(**kwargs, **rules)


@pytest.mark.parametrize(("section", "kwargs", "field"), [
    (EvaluationSpec, {"thresholds": {"accuracy": float("nan")}}, "thresholds.accuracy"),
    (GateSpec, {"margin": -0.01}, "margin"),
    (GateSpec, {"method": "bayes"}, "method"),
    (GateSpec, {"bootstrap_samples": 10}, "bootstrap_samples"),
    (GateSpec, {"confidence": 1.0}, "confidence"),
    (GateSpec, {"slices": [{"column": "a", "max_regression": 0.1}, {"column": "a", "max_regression": 0.2}]},
     "names a column more than once"),
    (SliceSpec, {"column": "region", "thresholds": {"accuracy": 0.5}, "min_rows": 0}, "min_rows"),
    (SliceSpec, {"column": "", "max_regression": 0.1}, "column"),
    (SliceSpec, {"column": "region", "max_regression": -1.0}, "max_regression"),
    (SliceSpec, {"column": "region", "thresholds": {"accuracy": "high"}}, "thresholds.accuracy"),
    (SliceSpec, {"column": "region"}, "checks nothing; set thresholds and/or max_regression"),
], ids=["threshold_value", "margin", "method", "bootstrap_samples", "confidence", "duplicate_slice", "min_rows",
        "slice_column", "max_regression", "slice_threshold_value", "checks_nothing"])
def test_the_gate_rules_are_validated_by_the_spec(section, kwargs, field):
    """The gate's settings are declared once, in the spec: a bad value is refused there, naming the field."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=re.escape(field)):
        section(**kwargs)


def test_config_from_the_spec_takes_thresholds_and_the_gate_section():
    from kiln.tasks.settings import REPO_ROOT
    from kiln.tasks.spec import load_spec

    spec = load_spec(REPO_ROOT / "dags" / "pipelines" / "penguins_species.yaml")
    spec = spec.model_copy(update={"evaluation": spec.evaluation.model_validate({
        **spec.evaluation.model_dump(), "gate": {"margin": 0.01, "method": "bootstrap",
                                                 "slices": [{"column": "island", "min_rows": 10,
                                                             "thresholds": {"accuracy": 0.8}}]}})})

    config = GateConfig.from_spec(spec)

    assert (config.task, config.primary_metric, config.rules.margin, config.rules.method, config.seed) == \
        ("classification", "accuracy", 0.01, "bootstrap", spec.training.seed)
    assert config.thresholds == {"accuracy": 0.9, "macro_f1": 0.85}
    assert config.rules.slices == [SliceSpec(column="island", min_rows=10, thresholds={"accuracy": 0.8})]
