"""Metrics of a model on one split, and thresholds checked in each metric's direction.

``evaluate`` reports them for the candidate; ``gate`` computes them again for the champion on the same rows.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from sklearn import metrics as skm

from kiln.tasks.spec import HIGHER_IS_BETTER, TaskType

log = logging.getLogger(__name__)


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
