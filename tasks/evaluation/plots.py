"""The plots ``evaluate`` writes next to its report: a confusion matrix or a residual plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn import metrics as skm


def _new_figure(width: float, height: float) -> Any:
    # The Figure API draws with Agg without pyplot, so no global backend switch and no GUI state in workers.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_confusion(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], path: Path) -> Path:
    """A confusion matrix of class indices, with counts in the cells (up to 30 classes), as a PNG."""
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


def plot_residuals(y_true: np.ndarray, y_pred: np.ndarray, path: Path) -> Path:
    """Residuals (true - predicted) against the prediction, as a PNG."""
    fig = _new_figure(6, 4.5)
    ax = fig.add_subplot()
    ax.scatter(y_pred, y_true - y_pred, s=12, alpha=0.7)
    ax.axhline(0.0, color="grey", linewidth=1)
    ax.set(xlabel="predicted", ylabel="true - predicted", title=f"Residuals ({len(y_true)} test rows)")
    fig.savefig(path, format="png")
    return path
