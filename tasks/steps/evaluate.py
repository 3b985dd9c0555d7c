"""The ``evaluate`` step: score a trained model on the held-out test split, plot it, and log to MLflow.

The thresholds from the spec are checked here for the report only; the ``gate`` step decides.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.settings import get_settings
from kiln.tasks.spec import PipelineSpec, TaskType
from kiln.tasks.spec.base import metric_problem
from kiln.tasks.storage.artifacts import read_json, write_json

log = logging.getLogger(__name__)

CONFUSION_PNG = "confusion_matrix.png"
RESIDUALS_PNG = "residuals.png"
#: Prefix of every metric key this step reports.
SPLIT: Literal["test"] = "test"


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
        problem = metric_problem(self.task, [self.primary_metric, *self.thresholds])
        if problem:
            raise ValueError(f"EvaluateConfig: {problem}")
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
class EvaluateResult:
    """What ``evaluate`` measured and wrote."""

    metrics: dict[str, float]
    """``test/<name>`` to value."""
    n_test: int
    plot_file: Path
    report_file: Path
    threshold_checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per plain metric name: ``{threshold, value, passed}``."""
    mlflow_run_id: str | None = None
    """The run's MLflow run, which received the metrics, the report and the plot."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (e.g. for XCom)."""
        return {"metrics": dict(self.metrics), "n_test": self.n_test, "plot_file": str(self.plot_file),
                "report_file": str(self.report_file), "threshold_checks": self.threshold_checks,
                "mlflow_run_id": self.mlflow_run_id}


def run_evaluate(config: EvaluateConfig, features_dir: Path, model_dir: Path, out_dir: Path) -> EvaluateResult:
    """Score the model in ``model_dir`` on the test split of ``features_dir``; write the report and a plot.

    Args:
        config: the step's settings.
        features_dir: the ``build_features`` output folder.
        model_dir: the ``train`` output folder (holding the exported program ``model.pt2``).
        out_dir: an empty folder to write into (the caller publishes it).

    Raises:
        ValueError: an empty test split, or features, model and config that disagree on the task or width.
        ModelExportError: ``model.pt2`` is missing or cannot be loaded.
    """
    import numpy as np

    from kiln.tasks.bundle.program import load_program
    from kiln.tasks.evaluation.metrics import check_thresholds, compute_metrics
    from kiln.tasks.evaluation.plots import plot_confusion, plot_residuals
    from kiln.tasks.features.splits import load_split
    from kiln.tasks.features.transform import FEATURE_SPEC_FILE

    features_dir, out_dir = Path(features_dir), Path(out_dir)
    x, y = load_split(features_dir, SPLIT)
    if len(x) == 0:
        raise ValueError(f"the test split in {features_dir} has 0 rows; raise features.test_fraction or "
                         "collect more data")
    spec = read_json(features_dir / FEATURE_SPEC_FILE)
    # The exported program, not model.pt: it runs without the pipeline's code (a custom network's factory).
    program = load_program(model_dir)
    _check_compatible(config, spec, program.meta, features_dir, Path(model_dir))
    y_pred = program.predict(x)
    np.save(out_dir / keys.PREDICTIONS_FILE, y_pred)
    plain = compute_metrics(config.task, y, y_pred, spec.get("n_classes"))
    metrics = {f"{SPLIT}/{k}": v for k, v in plain.items()}
    checks = check_thresholds(plain, config.thresholds)
    if config.task == "classification":
        plot_file = plot_confusion(y, y_pred.argmax(axis=1), spec["classes"], out_dir / CONFUSION_PNG)
    else:
        plot_file = plot_residuals(y, y_pred, out_dir / RESIDUALS_PNG)
    report_file = write_json(out_dir / keys.METRICS_FILE, {
        **metrics, "n_test": len(x), "task": config.task, "primary_metric": config.primary_metric,
        "thresholds": dict(config.thresholds), "threshold_checks": checks})
    log.info("evaluate: %d test rows; %s", len(x), ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    for name, check in checks.items():
        log.info("threshold %s: value %s, threshold %s, %s", name, check["value"], check["threshold"],
                 "passed" if check["passed"] else "NOT passed")
    if config.mlflow_run_id:
        _log_to_mlflow(config, metrics, [report_file, plot_file])
    return EvaluateResult(metrics=metrics, n_test=len(x), plot_file=plot_file, report_file=report_file,
                      threshold_checks=checks)


def evaluate(ctx: RunContext) -> EvaluateResult:
    """Score the trained model on the test split into ``<run>/evaluate`` and close the MLflow run."""
    from kiln.tasks.tracking.runs import finish_run

    tracking_uri = get_settings().mlflow_tracking_uri
    run_id = ctx.mlflow_run()
    config = EvaluateConfig.from_spec(ctx.spec, mlflow_tracking_uri=tracking_uri, mlflow_run_id=run_id)
    result = ctx.publish(keys.EVALUATE, lambda out: run_evaluate(
        config, ctx.input_dir(keys.BUILD_FEATURES), ctx.input_dir(keys.TRAIN), out))
    finish_run(tracking_uri, run_id)
    published = ctx.input_dir(keys.EVALUATE)
    return replace(result, plot_file=published / result.plot_file.name,
                   report_file=published / result.report_file.name, mlflow_run_id=run_id)


def _check_compatible(config: EvaluateConfig, spec: dict[str, Any], meta: dict[str, Any], features_dir: Path,
                      model_dir: Path) -> None:
    from kiln.tasks.features.transform import FEATURE_SPEC_FILE

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


def _log_to_mlflow(config: EvaluateConfig, metrics: dict[str, float], files: list[Path]) -> None:
    """Add metrics and files to the existing run ``config.mlflow_run_id`` (no new run is started)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=config.mlflow_tracking_uri)
    assert config.mlflow_run_id is not None  # checked by the caller
    now = int(time.time() * 1000)
    client.log_batch(config.mlflow_run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    for path in files:
        client.log_artifact(config.mlflow_run_id, str(path), artifact_path=keys.MLFLOW_EVALUATE_PATH)
    log.info("logged %d metrics and %d artifacts to MLflow run %s", len(metrics), len(files), config.mlflow_run_id)
