"""Live model quality: the primary metric on the captured rows whose labels came back, against the test figure.

The metrics are :func:`kiln.tasks.evaluation.metrics.compute_metrics`'s, on what the capture holds: the predicted
class and its probability (classification) or the predicted value (regression). A captured row does not hold
the other classes' probabilities, so for more than two classes only the metrics of the predicted class are
exact (``accuracy``, ``macro_f1``); ``log_loss`` is left out there (it needs the probability of the true class).
With two classes the probability vector is known, and every metric is kept.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from kiln.tasks.monitoring.drift import PREDICTED_CLASS, PREDICTED_VALUE, DriftThresholds
from kiln.tasks.monitoring.window import LABEL

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

#: Metrics of the predicted class alone (exact from a captured row whatever the number of classes).
EXACT_MULTICLASS = ("accuracy", "macro_f1")


Status = Literal["breach", "ok", "not enough labels", "not computable"]


@dataclass(frozen=True)
class Quality:
    """The live primary metric against the baseline's test figure."""

    status: Status
    labelled_rows: int
    """Captured rows with a usable label."""
    metric: str | None = None
    """The primary metric (the gate's)."""
    baseline: float | None = None
    """Its figure on the test split at training."""
    live: float | None = None
    drop: float | None = None
    """How much worse live is, in the metric's direction (negative: better)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Every metric computable from the captured rows."""
    message: str = ""

    @property
    def breached(self) -> bool:
        """Whether the verdict is a breach."""
        return self.status == "breach"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return asdict(self)

    def figures(self) -> dict[str, Any] | None:
        """``latest.json``'s quality entry (the gauges' contract), or None without a live figure."""
        if self.live is None:
            return None
        return {"metric": self.metric, "live": self.live, "baseline": self.baseline, "breach": self.breached}


def live_quality(labelled: pd.DataFrame, predictions: dict[str, Any], metrics: dict[str, Any],
                 thresholds: DriftThresholds) -> Quality:
    """The live primary metric on the rows with a label, and whether it fell past ``max_metric_drop``.

    Args:
        labelled: captured rows with a :data:`~kiln.tasks.monitoring.window.LABEL` column
            (:func:`~kiln.tasks.monitoring.window.join_labels`); rows whose label is ``None`` are left out.
        predictions: the baseline's ``predictions`` (its ``kind`` says classification or regression; its class
            shares name the model's classes).
        metrics: the baseline's ``metrics``: ``{"primary": name, "value": test figure, "all": {...}}``.
        thresholds: ``min_rows`` labelled rows are needed for a verdict; ``max_metric_drop`` is the breach.

    Returns:
        The verdict and the figures. Regression labels that do not read as numbers are left out.
    """
    from kiln.tasks.spec import HIGHER_IS_BETTER

    primary, baseline = metrics.get("primary"), metrics.get("value")
    rows = labelled[labelled[LABEL].notna()] if LABEL in labelled.columns else labelled.iloc[:0]
    classification = predictions.get("kind") == "classes"
    live_metrics, used = (_classification(rows, predictions) if classification else _regression(rows))
    def verdict(status: Status, message: str, live: float | None = None, drop: float | None = None) -> Quality:
        return Quality(status, used, primary, baseline, live, drop, live_metrics, message)

    if used < thresholds.min_rows:
        return verdict("not enough labels",
                       f"{used} labelled rows, fewer than min_rows {thresholds.min_rows}: no quality verdict")
    if primary not in live_metrics or primary not in HIGHER_IS_BETTER or baseline is None:
        return verdict("not computable",
                       f"the primary metric {primary!r} cannot be computed from captured rows (computable: "
                       f"{', '.join(sorted(live_metrics))})" if primary not in live_metrics else
                       f"the baseline has no test figure for {primary!r}")
    live = live_metrics[primary]
    drop = baseline - live if HIGHER_IS_BETTER[primary] else live - baseline
    breached = drop > thresholds.max_metric_drop + 1e-12
    message = (f"live {primary} {live:.4f} on {used} labelled rows, test {baseline:.4f}: "
               f"{'worse' if drop > 0 else 'not worse'} by {abs(drop):.4f} (max_metric_drop "
               f"{thresholds.max_metric_drop:g}){': breach' if breached else ''}")
    if breached:
        log.warning("%s", message)
    return verdict("breach" if breached else "ok", message, live, drop)


def _classification(rows: pd.DataFrame, predictions: dict[str, Any]) -> tuple[dict[str, float], int]:
    """Metrics of labelled classification rows, and the number of rows used (those with a predicted class)."""
    import numpy as np

    from kiln.tasks.evaluation.metrics import compute_metrics

    rows = rows[rows[PREDICTED_CLASS].notna()] if PREDICTED_CLASS in rows.columns else rows.iloc[:0]
    if rows.empty:
        return {}, 0
    labels, predicted = rows[LABEL].astype(str).to_numpy(), rows[PREDICTED_CLASS].astype(str).to_numpy()
    # A label the model never had is a class it can only get wrong: it joins the classes.
    classes = sorted(set(predictions.get("shares", {})) | set(labels) | set(predicted))
    index = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    if k < 2:
        classes, k = [*classes, "(other)"], 2
    p = rows[PREDICTED_VALUE].astype(float).fillna(1.0).clip(1 / k, 1).to_numpy() \
        if PREDICTED_VALUE in rows.columns else np.ones(len(rows))
    # The predicted class holds p; the rest is spread evenly (exact for two classes; for more, only metrics of
    # the predicted class are kept, so the spread never shows).
    probabilities = np.repeat(((1 - p) / (k - 1))[:, None], k, axis=1)
    probabilities[np.arange(len(rows)), [index[c] for c in predicted]] = p
    y_true = np.array([index[c] for c in labels])
    out = compute_metrics("classification", y_true, probabilities, k)
    if k > 2:
        out = {name: value for name, value in out.items() if name in EXACT_MULTICLASS}
    return out, len(rows)


def _regression(rows: pd.DataFrame) -> tuple[dict[str, float], int]:
    """Metrics of labelled regression rows (labels are text in the feedback format)."""
    import numpy as np
    import pandas as pd

    from kiln.tasks.evaluation.metrics import compute_metrics

    if PREDICTED_VALUE not in rows.columns:
        return {}, 0
    truth = pd.to_numeric(rows[LABEL], errors="coerce")
    value = pd.to_numeric(rows[PREDICTED_VALUE], errors="coerce")
    usable = truth.notna() & value.notna()
    if (~usable).sum():
        log.warning("%d labelled rows left out of the quality: a label or prediction that is not a number",
                    int((~usable).sum()))
    if not usable.any():
        return {}, 0
    return compute_metrics("regression", truth[usable].to_numpy(np.float64), value[usable].to_numpy(np.float64),
                           None), int(usable.sum())
