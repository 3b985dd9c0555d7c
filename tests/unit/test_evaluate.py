"""Unit tests for the ``evaluate`` step: metric values, the report and plot, and logging to an MLflow run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from synthetic import save_trained, write_run_dirs

from kiln.tasks.evaluation.metrics import check_thresholds, compute_metrics
from kiln.tasks.features.splits import TEST_FILE
from kiln.tasks.pipeline.keys import METRICS_FILE
from kiln.tasks.spec import ModelSpec
from kiln.tasks.steps.evaluate import CONFUSION_PNG, RESIDUALS_PNG, EvaluateConfig, run_evaluate
from kiln.tasks.training.networks import build_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("task", "y_true", "y_pred", "n_classes", "expected"), [
    ("classification", [0, 1, 1, 0], [[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.4, 0.6]], 2,
     # predictions 0,1,0,1: one hit per class; AUC: positives 0.7, 0.4 beat negatives 0.2, 0.6 in 3 of 4 pairs
     {"accuracy": 0.5, "macro_f1": 0.5, "roc_auc": 0.75,
      "log_loss": -(math.log(0.8) + math.log(0.7) + math.log(0.4) + math.log(0.4)) / 4}),
    ("classification", [0, 1, 1], [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1]], 3,
     # class 2 is in neither labels nor predictions; F1 of classes 0 and 1 is 2/3 each
     {"accuracy": 2 / 3, "macro_f1": 2 / 3, "log_loss": -(math.log(0.7) + math.log(0.8) + math.log(0.4)) / 3}),
    ("regression", [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 5.0], None,
     # one error of 1: MSE 1/4; total sum of squares 5
     {"rmse": 0.5, "mae": 0.25, "r2": 0.8}),
], ids=["binary", "multiclass_with_absent_class", "regression"])
def test_compute_metrics_matches_hand_computed_values(task, y_true, y_pred, n_classes, expected):
    got = compute_metrics(task, np.array(y_true), np.array(y_pred, dtype=np.float32), n_classes)

    assert got == pytest.approx(expected, rel=1e-6)


def test_roc_auc_is_left_out_when_the_split_holds_one_class():
    got = compute_metrics("classification", np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]), 2)

    assert "roc_auc" not in got and got["accuracy"] == 0.5


@pytest.mark.parametrize(("y_true", "y_pred", "match"), [
    ([], np.zeros((0, 2)), "0 rows"),
    ([0, 1], [[0.5, 0.5], [0.5, 0.5]], r"shape \(2, 3\)"),
    ([0, 1], [[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]], "not logits"),
], ids=["empty", "wrong_width", "logits"])
def test_compute_metrics_rejects_bad_input(y_true, y_pred, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics("classification", np.array(y_true), np.array(y_pred), 3)


@pytest.mark.parametrize(("metric", "value", "threshold", "passed"), [
    ("accuracy", 0.95, 0.9, True),
    ("accuracy", 0.85, 0.9, False),
    ("log_loss", 0.2, 0.3, True),
    ("rmse", 1.5, 1.0, False),
], ids=["higher_passes", "higher_fails", "lower_passes", "lower_fails"])
def test_thresholds_follow_each_metric_direction(metric, value, threshold, passed):
    checks = check_thresholds({metric: value}, {metric: threshold})

    assert checks == {metric: {"threshold": threshold, "value": value, "passed": passed}}


def test_threshold_on_a_metric_that_was_not_computed_fails():
    assert check_thresholds({"accuracy": 1.0}, {"roc_auc": 0.5})["roc_auc"]["passed"] is False


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"task": "classification", "primary_metric": "rmse", "thresholds": {}}, "metric 'rmse'"),
    ({"task": "regression", "primary_metric": "rmse", "thresholds": {"accuracy": 0.9}}, "metric 'accuracy'"),
    ({"task": "regression", "primary_metric": "rmse", "mlflow_run_id": "abc"}, "mlflow_tracking_uri"),
], ids=["primary_for_other_task", "threshold_for_other_task", "run_without_tracking_uri"])
def test_config_rejects_inconsistent_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EvaluateConfig(**kwargs)


def make_run_dirs(tmp_path: Path, task: str) -> tuple[Path, Path]:
    """A features folder from ``run_build_features`` and an untrained MLP saved next to it."""
    rng = np.random.default_rng(0)
    n = 40
    df = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n),
                       "kind": pd.array(rng.choice(["p", "q"], n), dtype="string")})
    if task == "classification":
        df["y"] = pd.array(["cat", "dog"] * (n // 2), dtype="string")
    else:
        df["y"] = 2 * df["a"] + rng.normal(scale=0.1, size=n)
    types = {"a": "numeric", "b": "numeric", "kind": "categorical",
             "y": "categorical" if task == "classification" else "numeric"}
    return write_run_dirs(tmp_path, df, types, task)


def test_run_evaluate_classification_writes_report_and_confusion_matrix(tmp_path):
    features, model = make_run_dirs(tmp_path, "classification")
    out = tmp_path / "eval"
    out.mkdir()
    config = EvaluateConfig(task="classification", primary_metric="accuracy",
                            thresholds={"accuracy": 0.0, "log_loss": 0.0})

    result = run_evaluate(config, features, model, out)

    assert set(result.metrics) == {"test/accuracy", "test/macro_f1", "test/log_loss", "test/roc_auc"}
    assert result.n_test == 8 and result.plot_file == out / CONFUSION_PNG
    assert result.plot_file.read_bytes().startswith(PNG_MAGIC)
    report = json.loads((out / METRICS_FILE).read_text())
    assert report["n_test"] == 8 and report["test/accuracy"] == result.metrics["test/accuracy"]
    assert report["thresholds"] == {"accuracy": 0.0, "log_loss": 0.0}
    assert report["threshold_checks"]["accuracy"]["passed"] is True
    assert report["threshold_checks"]["log_loss"] == {"threshold": 0.0, "value": result.metrics["test/log_loss"],
                                                      "passed": False}
    assert json.loads(json.dumps(result.to_dict()))["report_file"] == str(out / METRICS_FILE)


def test_run_evaluate_regression_writes_residual_plot(tmp_path):
    features, model = make_run_dirs(tmp_path, "regression")
    out = tmp_path / "eval"
    out.mkdir()

    result = run_evaluate(EvaluateConfig(task="regression", primary_metric="rmse"), features, model, out)

    assert set(result.metrics) == {"test/rmse", "test/mae", "test/r2"}
    assert result.metrics["test/rmse"] > 0
    assert (out / RESIDUALS_PNG).read_bytes().startswith(PNG_MAGIC)


def test_run_evaluate_logs_metrics_and_artifacts_to_the_given_mlflow_run(tmp_path):
    from mlflow import MlflowClient

    features, model = make_run_dirs(tmp_path, "classification")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("kiln-test", artifact_location=(tmp_path / "mlartifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    out = tmp_path / "eval"
    out.mkdir()
    config = EvaluateConfig(task="classification", primary_metric="accuracy", mlflow_tracking_uri=uri,
                            mlflow_run_id=run_id)

    result = run_evaluate(config, features, model, out)

    logged = client.get_run(run_id).data.metrics
    assert logged["test/accuracy"] == pytest.approx(result.metrics["test/accuracy"])
    assert set(logged) == set(result.metrics)
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluate")}
    assert artifacts == {f"evaluate/{METRICS_FILE}", f"evaluate/{CONFUSION_PNG}"}
    assert len(client.search_runs([experiment])) == 1  # no new run was started


def test_empty_test_split_is_an_error(tmp_path):
    features, model = make_run_dirs(tmp_path, "classification")
    pd.read_parquet(features / TEST_FILE).iloc[:0].to_parquet(features / TEST_FILE, index=False)

    with pytest.raises(ValueError, match="test split .* has 0 rows"):
        run_evaluate(EvaluateConfig(task="classification", primary_metric="accuracy"), features, model,
                     tmp_path)


def test_model_of_another_width_is_rejected(tmp_path):
    features, model = make_run_dirs(tmp_path, "classification")
    spec = ModelSpec(hidden_sizes=[4])
    save_trained(model, build_model(spec, 3, 2), spec, 3, 2, "classification")

    with pytest.raises(ValueError, match="takes 3 features"):
        run_evaluate(EvaluateConfig(task="classification", primary_metric="accuracy"), features, model,
                     tmp_path)


def test_config_from_the_example_spec_carries_primary_metric_and_thresholds():
    from kiln.tasks.settings import REPO_ROOT
    from kiln.tasks.spec import load_spec

    spec = load_spec(REPO_ROOT / "dags" / "pipelines" / "penguins_species.yaml")

    config = EvaluateConfig.from_spec(spec, mlflow_tracking_uri="sqlite:///x.db", mlflow_run_id="r1")

    assert (config.task, config.primary_metric) == ("classification", "accuracy")
    assert config.thresholds == {"accuracy": 0.9, "macro_f1": 0.85}


def test_evaluate_reads_the_exported_program_alone(tmp_path):
    """A custom network's code need not exist where evaluate runs: it reads model.pt2, never model.pt."""
    from kiln.tasks.bundle.program import ModelExportError

    features, model = make_run_dirs(tmp_path, "classification")
    (model / "model.pt").unlink()
    config = EvaluateConfig(task="classification", primary_metric="accuracy")
    (tmp_path / "a").mkdir()
    assert run_evaluate(config, features, model, tmp_path / "a").n_test == 8
    (model / "model.pt2").unlink()
    (tmp_path / "b").mkdir()
    with pytest.raises(ModelExportError, match=r"model.pt2 does not exist; the train step writes it"):
        run_evaluate(config, features, model, tmp_path / "b")
