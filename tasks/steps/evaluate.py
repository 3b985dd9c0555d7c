"""The ``evaluate`` step: score a trained model on the held-out test split, plot it, and log to MLflow.

The thresholds from the spec are checked here for the report only; the ``gate`` step decides.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from sklearn import metrics as skm

from kiln.tasks.spec import CLASSIFICATION_METRICS, HIGHER_IS_BETTER, REGRESSION_METRICS, PipelineSpec, TaskType
from kiln.tasks.steps.build_features import FEATURE_SPEC_FILE, load_split
from kiln.tasks.storage.artifacts import read_json, write_json
from kiln.tasks.training.networks import load_model, predict

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
#: The model's outputs on the test split, row for row (probabilities or values): what serving must reproduce.
PREDICTIONS_FILE = "test_predictions.npy"
CONFUSION_PNG = "confusion_matrix.png"
RESIDUALS_PNG = "residuals.png"
#: Folder inside the MLflow run that receives the report and the plot.
MLFLOW_ARTIFACT_PATH = "evaluate"
#: Prefix of every metric key this step reports.
SPLIT: Literal["test"] = "test"


def _task_metrics(task: str) -> tuple[str, ...]:
    return CLASSIFICATION_METRICS if task == "classification" else REGRESSION_METRICS


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of the ``evaluate`` step."""

    task: TaskType
    """``classification`` or ``regression``; must match the features and the model."""
    primary_metric: str
    """The metric models are compared on (plain name, e.g. ``accuracy``)."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """Per plain metric name, the minimum (or, for error metrics, maximum) value; reported, not enforced."""
    mlflow_tracking_uri: str | None = None
    """Tracking server of ``mlflow_run_id``; required when a run id is given."""
    mlflow_run_id: str | None = None
    """An existing MLflow run (the training run) that receives the metrics and artifacts; none: no logging."""

    def __post_init__(self) -> None:
        if self.task not in get_args(TaskType):
            raise ValueError(f"EvaluateConfig.task must be one of {get_args(TaskType)}, found {self.task!r}")
        allowed = _task_metrics(self.task)
        for name in [self.primary_metric, *self.thresholds]:
            if name not in allowed:
                raise ValueError(f"EvaluateConfig: metric {name!r} is not computed for task '{self.task}'; "
                                 f"allowed: {', '.join(allowed)}")
        if self.mlflow_run_id and not self.mlflow_tracking_uri:
            raise ValueError("EvaluateConfig.mlflow_run_id is set but mlflow_tracking_uri is not; pass the "
                             "tracking URI of that run (Settings.mlflow_tracking_uri)")

    @classmethod
    def from_spec(cls, spec: PipelineSpec, mlflow_tracking_uri: str | None = None,
                  mlflow_run_id: str | None = None) -> EvaluateConfig:
        """The config a pipeline spec implies."""
        return cls(task=spec.task, primary_metric=spec.primary_metric, thresholds=dict(spec.evaluation.thresholds),
                   mlflow_tracking_uri=mlflow_tracking_uri, mlflow_run_id=mlflow_run_id)


@dataclass(frozen=True)
class EvalResult:
    """What ``evaluate`` measured and wrote."""

    metrics: dict[str, float]
    """``test/<name>`` to value."""
    n_test: int
    plot_file: Path
    report_file: Path
    threshold_checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per plain metric name: ``{threshold, value, passed}``."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (e.g. for XCom)."""
        return {"metrics": dict(self.metrics), "n_test": self.n_test, "plot_file": str(self.plot_file),
                "report_file": str(self.report_file), "threshold_checks": self.threshold_checks}


def compute_metrics(task: TaskType, y_true: np.ndarray, y_pred: np.ndarray,
                    n_classes: int | None) -> dict[str, float]:
    """Plain-named metrics of one split.

    Classification: ``accuracy``, ``macro_f1`` (over the classes present in the labels or the predictions),
    ``log_loss`` (over all ``n_classes``, so a class missing from the split is fine) and, for two classes,
    ``roc_auc``. ROC AUC is left out, with a warning, when the split holds a single class, since it is undefined
    there. Regression: ``rmse``, ``mae`` and ``r2`` (left out for fewer than two rows).

    Args:
        task: ``classification`` or ``regression``.
        y_true: class indices ``[n]`` or true values ``[n]``.
        y_pred: class probabilities ``[n, n_classes]`` or predicted values ``[n]``.
        n_classes: number of classes (ignored for regression).

    Raises:
        ValueError: empty input, shapes that do not fit together, or class scores that are not probabilities.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred, dtype=np.float64)
    if len(y_true) == 0:
        raise ValueError("cannot compute metrics on 0 rows")
    if task == "regression":
        if y_pred.shape != y_true.shape:
            raise ValueError(f"regression predictions have shape {y_pred.shape}, labels {y_true.shape}")
        out = {"rmse": math.sqrt(skm.mean_squared_error(y_true, y_pred)),
               "mae": float(skm.mean_absolute_error(y_true, y_pred))}
        if len(y_true) >= 2:
            out["r2"] = float(skm.r2_score(y_true, y_pred))
        else:
            log.warning("r2 is undefined for a single row; left out of the metrics")
        return out
    if not n_classes or y_pred.shape != (len(y_true), n_classes):
        raise ValueError(f"classification probabilities must have shape ({len(y_true)}, {n_classes}), "
                         f"found {y_pred.shape}")
    sums = y_pred.sum(axis=1)
    if np.abs(sums - 1).max() > 1e-3:
        raise ValueError(f"classification predictions must be probabilities whose rows sum to 1 (found row sums "
                         f"{sums.min():.4g}..{sums.max():.4g}); pass softmax outputs, not logits")
    y_pred = y_pred / sums[:, None]  # float32 softmax rows are off by rounding; sklearn warns on that
    labels = list(range(n_classes))
    predicted = y_pred.argmax(axis=1)
    out = {"accuracy": float(skm.accuracy_score(y_true, predicted)),
           "macro_f1": float(skm.f1_score(y_true, predicted, average="macro", zero_division=0)),
           "log_loss": float(skm.log_loss(y_true, y_pred, labels=labels))}
    if n_classes == 2:
        if len(np.unique(y_true)) == 2:
            out["roc_auc"] = float(skm.roc_auc_score(y_true, y_pred[:, 1]))
        else:
            log.warning("roc_auc is undefined when the split holds one class only; left out of the metrics")
    return out


def check_thresholds(metrics: dict[str, float], thresholds: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Compare plain-named metrics with thresholds in each metric's direction; a missing metric fails."""
    checks: dict[str, dict[str, Any]] = {}
    for name, threshold in thresholds.items():
        value = metrics.get(name)
        if value is None:
            passed = False
        else:
            passed = value >= threshold if HIGHER_IS_BETTER[name] else value <= threshold
        checks[name] = {"threshold": threshold, "value": value, "passed": passed}
    return checks


def run_evaluate(config: EvaluateConfig, features_dir: Path, model_dir: Path, out_dir: Path) -> EvalResult:
    """Score the model in ``model_dir`` on the test split of ``features_dir``; write the report and a plot.

    Args:
        config: the step's settings.
        features_dir: the ``build_features`` output folder.
        model_dir: the ``train`` output folder (holding ``model.pt``).
        out_dir: an empty folder to write into (the caller publishes it).

    Raises:
        ValueError: an empty test split, or features, model and config that disagree on the task or width.
    """
    features_dir, out_dir = Path(features_dir), Path(out_dir)
    x, y = load_split(features_dir, SPLIT)
    if len(x) == 0:
        raise ValueError(f"the test split in {features_dir} has 0 rows; raise features.test_fraction or "
                         "collect more data")
    spec = read_json(features_dir / FEATURE_SPEC_FILE)
    model = load_model(model_dir)
    _check_compatible(config, spec, model.meta, features_dir, Path(model_dir))
    y_pred = predict(model, x)
    np.save(out_dir / PREDICTIONS_FILE, y_pred)
    plain = compute_metrics(config.task, y, y_pred, spec.get("n_classes"))
    metrics = {f"{SPLIT}/{k}": v for k, v in plain.items()}
    checks = check_thresholds(plain, config.thresholds)
    if config.task == "classification":
        plot_file = _plot_confusion(y, y_pred.argmax(axis=1), spec["classes"], out_dir / CONFUSION_PNG)
    else:
        plot_file = _plot_residuals(y, y_pred, out_dir / RESIDUALS_PNG)
    report_file = write_json(out_dir / METRICS_FILE, {
        **metrics, "n_test": len(x), "task": config.task, "primary_metric": config.primary_metric,
        "thresholds": dict(config.thresholds), "threshold_checks": checks})
    log.info("evaluate: %d test rows; %s", len(x), ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    for name, check in checks.items():
        log.info("threshold %s: value %s, threshold %s, %s", name, check["value"], check["threshold"],
                 "passed" if check["passed"] else "NOT passed")
    if config.mlflow_run_id:
        _log_to_mlflow(config, metrics, [report_file, plot_file])
    return EvalResult(metrics=metrics, n_test=len(x), plot_file=plot_file, report_file=report_file,
                      threshold_checks=checks)


def _check_compatible(config: EvaluateConfig, spec: dict[str, Any], meta: dict[str, Any], features_dir: Path,
                      model_dir: Path) -> None:
    if spec["task"] != config.task or meta["task"] != config.task:
        raise ValueError(f"task mismatch: config '{config.task}', {features_dir / FEATURE_SPEC_FILE} "
                         f"'{spec['task']}', model in {model_dir} '{meta['task']}'; rerun the pipeline end to end")
    if meta["input_dim"] != spec["input_dim"]:
        raise ValueError(f"the model in {model_dir} takes {meta['input_dim']} features but {features_dir} has "
                         f"{spec['input_dim']}; retrain on these features")
    expected_outputs = spec["n_classes"] if config.task == "classification" else 1
    if meta["n_outputs"] != expected_outputs:
        raise ValueError(f"the model in {model_dir} has {meta['n_outputs']} outputs but {features_dir} needs "
                         f"{expected_outputs}; retrain on these features")


def _new_figure(width: float, height: float) -> Any:
    # The Figure API draws with Agg without pyplot, so no global backend switch and no GUI state in workers.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _plot_confusion(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], path: Path) -> Path:
    n = len(classes)
    matrix = skm.confusion_matrix(y_true, y_pred, labels=list(range(n)))
    size = max(4.0, 0.5 * n + 2)
    fig = _new_figure(size, size)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true",
           title=f"Confusion matrix ({len(y_true)} test rows)")
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    if n <= 30:  # beyond that the counts are unreadable
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center",
                    color="white" if count > matrix.max() / 2 else "black", fontsize=8)
    fig.savefig(path, format="png")
    return path


def _plot_residuals(y_true: np.ndarray, y_pred: np.ndarray, path: Path) -> Path:
    fig = _new_figure(6, 4.5)
    ax = fig.add_subplot()
    ax.scatter(y_pred, y_true - y_pred, s=12, alpha=0.7)
    ax.axhline(0.0, color="grey", linewidth=1)
    ax.set(xlabel="predicted", ylabel="true - predicted", title=f"Residuals ({len(y_true)} test rows)")
    fig.savefig(path, format="png")
    return path


def _log_to_mlflow(config: EvaluateConfig, metrics: dict[str, float], files: list[Path]) -> None:
    """Add metrics and files to the existing run ``config.mlflow_run_id`` (no new run is started)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=config.mlflow_tracking_uri)
    assert config.mlflow_run_id is not None  # checked by the caller
    now = int(time.time() * 1000)
    client.log_batch(config.mlflow_run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    for path in files:
        client.log_artifact(config.mlflow_run_id, str(path), artifact_path=MLFLOW_ARTIFACT_PATH)
    log.info("logged %d metrics and %d artifacts to MLflow run %s", len(metrics), len(files), config.mlflow_run_id)
