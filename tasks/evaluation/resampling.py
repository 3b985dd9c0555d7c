"""Metrics of many bootstrap resamples at once, vectorised over resamples (the gate's confidence bounds).

A resample is given by how often it draws each test row (a row of ``counts``), so one weighted pass per metric
replaces a gather and a ``compute_metrics`` call per resample: 1000 resamples of 2,000 rows take well under a
second. The values equal ``kiln.tasks.steps.evaluate.compute_metrics`` on the explicitly drawn rows (tested).
"""

from __future__ import annotations

import numpy as np

from kiln.tasks.spec import TaskType


def resampled_metrics(task: TaskType, y_true: np.ndarray, y_pred: np.ndarray, n_classes: int | None,
                      counts: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Metrics of many resamples at once, each given by how often it draws every row.

    Resample ``i`` holds row ``j`` ``counts[i, j]`` times; its metrics equal ``compute_metrics`` on those rows.
    A metric that is undefined on a resample (roc_auc with one class, r2 with constant targets) is NaN there.

    Args:
        task: ``classification`` or ``regression``.
        y_true: class indices or true values, ``[n]``.
        y_pred: probabilities ``[n, n_classes]`` or values ``[n]``, already checked by ``compute_metrics``.
        n_classes: number of classes (None for regression).
        counts: non-negative draw counts ``[b, n]``; every row sums to the resample size.
        names: the plain metric names wanted.

    Returns:
        Per name, the ``[b]`` values.
    """
    w = np.asarray(counts, dtype=np.float64)
    size = w.sum(axis=1)
    if task == "regression":
        return {m: _regression_metric(m, np.asarray(y_true, dtype=np.float64), y_pred, w, size) for m in names}
    y = np.asarray(y_true).astype(np.int64)
    p = y_pred / y_pred.sum(axis=1, keepdims=True)
    return {m: _classification_metric(m, y, p, int(n_classes or 0), w, size) for m in names}


def _classification_metric(name: str, y: np.ndarray, p: np.ndarray, k: int, w: np.ndarray,
                           size: np.ndarray) -> np.ndarray:
    predicted = p.argmax(axis=1)
    if name == "accuracy":
        return w @ (predicted == y).astype(np.float64) / size
    if name == "log_loss":
        eps = np.finfo(np.float64).eps  # sklearn clips to [eps, 1 - eps] in the probabilities' dtype
        return w @ -np.log(np.clip(p[np.arange(len(y)), y], eps, 1 - eps)) / size
    if name == "macro_f1":
        true_1h, pred_1h = np.eye(k)[y], np.eye(k)[predicted]
        tp, n_true, n_pred = w @ (true_1h * pred_1h), w @ true_1h, w @ pred_1h
        present = (n_true + n_pred) > 0  # sklearn averages over classes in the labels or the predictions
        f1 = np.divide(2 * tp, n_true + n_pred, out=np.zeros_like(tp), where=present)
        return f1.sum(axis=1) / present.sum(axis=1)
    if name == "roc_auc" and k == 2:
        return _weighted_auc(y, p[:, 1], w)
    return np.full(len(w), np.nan)


def _weighted_auc(y: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC AUC per row of weights: P(positive scores above negative), ties counting half."""
    order = np.argsort(score, kind="stable")
    sorted_score, pos = score[order], (y[order] == 1).astype(np.float64)
    w_pos, w_neg = w[:, order] * pos, w[:, order] * (1 - pos)
    first_of_group = np.r_[True, sorted_score[1:] != sorted_score[:-1]]  # rows of equal score form one group
    starts, group = np.flatnonzero(first_of_group), np.cumsum(first_of_group) - 1
    ends = np.r_[starts[1:], len(score)]
    neg_before = np.concatenate([np.zeros((len(w), 1)), np.cumsum(w_neg, axis=1)], axis=1)
    below = neg_before[:, starts[group]]
    tied = neg_before[:, ends[group]] - below
    pairs = w_pos.sum(axis=1) * w_neg.sum(axis=1)
    wins = (w_pos * (below + 0.5 * tied)).sum(axis=1)
    return np.divide(wins, pairs, out=np.full(len(w), np.nan), where=pairs > 0)


def _regression_metric(name: str, y: np.ndarray, pred: np.ndarray, w: np.ndarray, size: np.ndarray) -> np.ndarray:
    err = pred - y
    if name == "rmse":
        return np.sqrt(w @ err**2 / size)
    if name == "mae":
        return w @ np.abs(err) / size
    centred = y - y.mean()  # centring first keeps sum(w y^2) - (sum(w y))^2 / n free of cancellation
    s1, s2 = w @ centred, w @ centred**2
    total = s2 - s1**2 / size
    defined = total > 1e-12 * np.maximum(s2, np.finfo(np.float64).tiny)
    return 1 - np.divide(w @ err**2, total, out=np.full(len(w), np.nan), where=defined)
