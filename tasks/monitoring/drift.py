"""Drift of live inputs and predictions against the training baseline of the served bundle.

Per feature, two figures, and a verdict that needs both:

* **PSI** (population stability index), ``sum((live - base) * ln(live / base))`` over bins: how far the
  distribution moved, whatever the sample size. Numeric: 10 bins cut at the deciles of the baseline sample
  (equal baseline mass; the outer bins are open-ended, so values beyond the training range land in them);
  categorical: one bucket per training category, one for the rare ones (under 1 % in training: a few rows of
  them must not swing the figure) and one for values training never had.
* **a test**: the two-sample Kolmogorov-Smirnov test against the baseline sample (numeric) or the chi-square
  goodness-of-fit test of the live counts against the training frequencies (categorical, predicted classes, and
  numeric columns when the baseline has no sample, on the PSI bins): whether the move is more than chance.

A feature drifts when PSI >= ``psi_threshold`` AND p < ``p_value``: millions of rows make a negligible shift
"significant", and a hundred rows make a large PSI by chance; only a shift that is both large and real alarms.
Fewer than ``min_rows`` present values: no verdict ("not enough data"). An empty bin gets the share
:data:`EPSILON` (PSI is infinite on an empty bin); a value training never had gets the expected share
:data:`UNSEEN_SHARE` (small but not zero, so the chi-square is defined and one stray value is no surprise).

Quality lives in :mod:`kiln.tasks.monitoring.quality`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from kiln.tasks.features.profile import ColumnProfile, DataProfile

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

log = logging.getLogger(__name__)

#: The share given to an empty bin in PSI (either side).
EPSILON = 1e-4
#: The expected share of the bucket of values the baseline never had.
UNSEEN_SHARE = 1e-3
#: Training categories below this share are pooled into one bucket.
RARE_SHARE = 0.01
#: Category values are compared on their first 100 characters, as the profile keeps them.
MAX_VALUE_CHARS = 100
DECILES = tuple(i / 10 for i in range(1, 10))
UNSEEN, RARE = "(unseen)", "(rare)"
#: The column of the live frame for each kind of prediction (the capture format).
PREDICTED_CLASS, PREDICTED_VALUE = "predicted_class", "predicted_value"

Status = Literal["drift", "ok", "not enough data", "not in traffic"]
Kind = Literal["numeric", "categorical"]
Test = Literal["ks", "chi-square"]


@dataclass(frozen=True)
class DriftThresholds:
    """When a figure is a drift or a breach (the spec's ``monitoring`` section supplies them)."""

    psi_threshold: float = 0.2
    """PSI at or above which a distribution moved enough to matter (0.1-0.2 is the usual "watch" band)."""
    p_value: float = 0.01
    """The test's p-value below which the move is not chance."""
    min_rows: int = 100
    """Fewer live values (or labelled rows, for quality) than this: no verdict."""
    max_metric_drop: float = 0.05
    """A quality breach when the live primary metric is worse than the baseline's test figure by more than this
    (in the metric's units, in its direction)."""

    def __post_init__(self) -> None:
        checks = {"psi_threshold": self.psi_threshold > 0, "p_value": 0 < self.p_value < 1,
                  "min_rows": isinstance(self.min_rows, int) and self.min_rows >= 1,
                  "max_metric_drop": self.max_metric_drop >= 0}
        allowed = {"psi_threshold": "> 0", "p_value": "in (0, 1)", "min_rows": "an integer >= 1",
                   "max_metric_drop": ">= 0"}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: {getattr(self, name)!r} is not allowed (must be {allowed[name]})")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return asdict(self)


@dataclass(frozen=True)
class FeatureDrift:
    """The drift figures and verdict of one feature (or of the predictions)."""

    column: str
    kind: Kind
    status: Status
    rows: int
    """Present (non-missing) live values."""
    psi: float | None = None
    test: Test | None = None
    statistic: float | None = None
    p_value: float | None = None
    missing_share: float | None = None
    """Share of live rows where the value is missing (``None``: the column is not in the traffic)."""
    baseline_missing_share: float | None = None
    bins: list[dict[str, Any]] = field(default_factory=list)
    """``{"bin", "baseline", "live"}`` shares per PSI bin (what a person reads to see where it moved)."""
    unseen: dict[str, int] = field(default_factory=dict)
    """Categorical: the most frequent live values training never had, with their counts."""
    message: str = ""

    @property
    def drifted(self) -> bool:
        """Whether the verdict is drift."""
        return self.status == "drift"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (NaN and infinities become ``None``)."""
        return {k: _finite(v) for k, v in asdict(self).items()}


def feature_drift(profile: DataProfile, sample: pd.DataFrame | None, live: pd.DataFrame,
                  thresholds: DriftThresholds) -> list[FeatureDrift]:
    """The drift of every column of the baseline profile (the model's raw inputs), in its order.

    Args:
        profile: the baseline's profile of the raw training inputs.
        sample: the baseline's sample of raw training rows (for the KS tests); ``None``: numeric columns are
            tested with the chi-square on the profile's quantile bins instead.
        live: the captured rows of the window.
        thresholds: when a figure is a drift.

    Returns:
        One :class:`FeatureDrift` per profiled column ("not in traffic" when the live rows lack it; "other"
        columns, neither numbers nor text, are left out).
    """
    out = []
    for name, column in profile.columns.items():
        base_missing = profile.missing_share(name)
        if name not in live.columns:
            kind: Kind = "numeric" if column.kind == "numeric" else "categorical"
            out.append(FeatureDrift(name, kind, "not in traffic", 0, baseline_missing_share=base_missing,
                                    message=f"'{name}' is not among the captured columns"))
        elif column.kind == "numeric":
            base = sample[name] if sample is not None and name in sample.columns else None
            out.append(numeric_drift(name, column, base_missing, live[name], base, thresholds))
        elif column.kind == "categorical":
            out.append(categorical_drift(name, column, base_missing, live[name], thresholds))
    return out


def numeric_drift(name: str, column: ColumnProfile, baseline_missing_share: float, live: pd.Series,
                  sample: pd.Series | None, thresholds: DriftThresholds) -> FeatureDrift:
    """PSI on the baseline deciles and the KS test (chi-square on the bins without a sample) of one column.

    Live values that do not read as numbers count as missing (the validation suite reports them).

    Returns:
        The figures and the verdict.
    """
    import numpy as np
    import pandas as pd

    numbers = pd.to_numeric(live, errors="coerce").to_numpy(dtype=np.float64)
    present = numbers[~np.isnan(numbers)]
    base = None if sample is None else pd.to_numeric(sample, errors="coerce").dropna().to_numpy(np.float64)
    if base is not None and len(base):
        edges = np.unique(np.quantile(base, DECILES))
        expected = _counts(edges, base) / len(base)
    else:
        base = None
        edges, expected = _profile_bins(column)
    figures = {"missing_share": _share_missing(live), "baseline_missing_share": baseline_missing_share,
               "rows": len(present)}
    if len(present) < thresholds.min_rows:
        return _too_few(name, "numeric", figures, thresholds)
    observed = _counts(edges, present)
    labels = _bin_labels(edges)
    test: Test
    if base is not None:
        from scipy.stats import ks_2samp

        result = ks_2samp(present, base)
        test, statistic, p = "ks", float(result.statistic), float(result.pvalue)
    else:
        test, (statistic, p) = "chi-square", _chisquare(observed, expected)
    return _verdict(name, "numeric", labels, expected, observed, test, statistic, p, figures, thresholds)


def categorical_drift(name: str, column: ColumnProfile, baseline_missing_share: float, live: pd.Series,
                      thresholds: DriftThresholds) -> FeatureDrift:
    """PSI and the chi-square test of one categorical column over the training categories, rare and unseen.

    Returns:
        The figures and the verdict, with the most frequent unseen values.
    """
    values = _category_values(live)
    if column.type == "bool":  # the profile holds Arrow's "true"; the server captures Python's "True"
        values = Counter({(v.lower() if v in ("True", "False") else v): n for v, n in values.items()})
    figures = {"missing_share": _share_missing(live), "baseline_missing_share": baseline_missing_share,
               "rows": values.total()}
    if values.total() < thresholds.min_rows:
        return _too_few(name, "categorical", figures, thresholds)
    present = sum(column.categories.values()) + column.other
    # Values beyond the profile's top categories were seen in training, but are not told apart from new ones.
    shares = {c: n / present for c, n in column.categories.items()} if present else {}
    if column.other:
        shares[RARE] = column.other / present
    return _distribution_drift(name, "categorical", shares, values, thresholds, figures)


def prediction_drift(predictions: dict[str, Any], live: pd.DataFrame, thresholds: DriftThresholds) -> FeatureDrift:
    """The drift of the answers: predicted-class shares, or predicted-value deciles, against the baseline's.

    Args:
        predictions: the baseline's ``predictions``: ``{"kind": "classes", "shares": {...}}`` or
            ``{"kind": "numeric", "quantiles": [q0, q10, ..., q100], "mean": m}``.
        live: the captured rows (``predicted_class`` / ``predicted_value``).
        thresholds: when a figure is a drift.

    Returns:
        The figures and the verdict, reported under the column name ``predicted_class`` or ``predicted_value``.

    Raises:
        ValueError: ``predictions`` of another kind, or numeric quantiles that are not 11 numbers.
    """
    import numpy as np
    import pandas as pd

    if predictions.get("kind") == "classes":
        values = _category_values(live[PREDICTED_CLASS]) if PREDICTED_CLASS in live.columns else Counter()
        figures = {"missing_share": None, "baseline_missing_share": None, "rows": values.total()}
        if values.total() < thresholds.min_rows:
            return _too_few(PREDICTED_CLASS, "categorical", figures, thresholds)
        return _distribution_drift(PREDICTED_CLASS, "categorical", dict(predictions["shares"]), values, thresholds,
                                   figures)
    if predictions.get("kind") != "numeric":
        raise ValueError(f"baseline predictions of kind {predictions.get('kind')!r}: expected 'classes' or 'numeric'")
    quantiles = [float(q) for q in predictions.get("quantiles", [])]
    if len(quantiles) != 11:
        raise ValueError(f"baseline prediction quantiles: expected 11 (q0, q10, ..., q100), found {len(quantiles)}")
    column = live[PREDICTED_VALUE] if PREDICTED_VALUE in live.columns else pd.Series(dtype=np.float64)
    numbers = pd.to_numeric(column, errors="coerce").dropna().to_numpy(np.float64)
    figures = {"missing_share": None, "baseline_missing_share": None, "rows": len(numbers)}
    if len(numbers) < thresholds.min_rows:
        return _too_few(PREDICTED_VALUE, "numeric", figures, thresholds)
    edges, expected = _level_bins(list(DECILES), quantiles[1:10])
    observed = _counts(edges, numbers)
    statistic, p = _chisquare(observed, expected)
    return _verdict(PREDICTED_VALUE, "numeric", _bin_labels(edges), expected, observed, "chi-square", statistic, p,
                    figures, thresholds)


def psi(expected: np.ndarray, observed: np.ndarray) -> float:
    """The population stability index of ``observed`` shares against ``expected`` shares (each clipped to
    :data:`EPSILON`, so an empty bin costs a large but finite amount)."""
    import numpy as np

    e = np.clip(np.asarray(expected, dtype=np.float64), EPSILON, None)
    o = np.clip(np.asarray(observed, dtype=np.float64), EPSILON, None)
    return float(np.sum((o - e) * np.log(o / e)))


def _distribution_drift(name: str, kind: Kind, shares: dict[str, float],
                        counts: Counter[str], thresholds: DriftThresholds, figures: dict[str, Any]) -> FeatureDrift:
    """PSI and chi-square of the live ``counts`` over the buckets of ``shares``, pooled rare ones and unseen ones.

    ``shares`` may hold :data:`RARE`: training values the profile did not list; live values it does not know
    then count as rare (they may be those), not unseen.
    """
    import numpy as np

    rare = {c for c, s in shares.items() if c == RARE or s < RARE_SHARE}
    kept = [c for c in shares if c not in rare]
    unknown = {v: n for v, n in counts.items() if v not in shares}
    listed_all = RARE not in shares
    labels, expected = [*kept], [shares[c] for c in kept]
    observed = [counts.get(c, 0) for c in kept]
    if rare:
        labels.append(RARE)
        expected.append(sum(shares[c] for c in rare))
        observed.append(sum(counts.get(c, 0) for c in rare if c != RARE) + (0 if listed_all else sum(unknown.values())))
    labels.append(UNSEEN)
    expected = [*(s * (1 - UNSEEN_SHARE) for s in expected), UNSEEN_SHARE]
    observed.append(sum(unknown.values()) if listed_all else 0)
    shares_array = np.array(expected, dtype=np.float64)
    figures = {**figures, "unseen": dict(Counter(unknown).most_common(5))}
    return _verdict(name, kind, labels, shares_array / shares_array.sum(), np.array(observed, dtype=np.float64),
                    "chi-square", *_chisquare(np.array(observed, dtype=np.float64), shares_array), figures,
                    thresholds, listed_all=listed_all)


def _verdict(name: str, kind: Kind, labels: list[str], expected: np.ndarray,
             observed: np.ndarray, test: Test, statistic: float, p: float,
             figures: dict[str, Any], thresholds: DriftThresholds, listed_all: bool = True) -> FeatureDrift:
    live_shares = observed / observed.sum()
    value = psi(expected, live_shares)
    drifted = value >= thresholds.psi_threshold and p < thresholds.p_value
    bins = [{"bin": label, "baseline": float(e), "live": float(o)}
            for label, e, o in zip(labels, expected, live_shares, strict=True)]
    verdict = "drift" if drifted else "no drift"
    message = (f"'{name}': {verdict}: PSI {value:.3f} (threshold {thresholds.psi_threshold:g}), {test} p-value "
               f"{p:.3g} (threshold {thresholds.p_value:g}) over {figures['rows']} values")
    if figures.get("unseen"):
        what = "values training never had" if listed_all else "values not among training's listed categories"
        message += f"; {what}: " + ", ".join(f"{v!r} x{n}" for v, n in figures["unseen"].items())
    if drifted:
        log.warning("%s", message)
    return FeatureDrift(name, kind, "drift" if drifted else "ok", psi=value, test=test, statistic=statistic,
                        p_value=p, bins=bins, message=message, **figures)


def _too_few(name: str, kind: Kind, figures: dict[str, Any],
             thresholds: DriftThresholds) -> FeatureDrift:
    return FeatureDrift(name, kind, "not enough data", **figures,
                        message=f"'{name}': {figures['rows']} live values, fewer than min_rows "
                                f"{thresholds.min_rows}: no drift verdict")


def _chisquare(observed: np.ndarray, expected_shares: np.ndarray) -> tuple[float, float]:
    """Chi-square goodness of fit of counts against shares (scaled to the same total, as scipy requires)."""
    import numpy as np
    from scipy.stats import chisquare

    shares = np.clip(np.asarray(expected_shares, dtype=np.float64), EPSILON, None)
    result = chisquare(observed, shares / shares.sum() * observed.sum())
    return float(result.statistic), float(result.pvalue)


def _counts(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Counts per bin ``(-inf, e0], (e0, e1], ..., (e_last, inf)``."""
    import numpy as np

    return np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(edges) + 1).astype(np.float64)


def _profile_bins(column: ColumnProfile) -> tuple[np.ndarray, np.ndarray]:
    """Bins cut at the profile's inner quantiles (0.01 ... 0.99), with their levels' differences as shares."""
    inner = sorted((float(q), v) for q, v in column.quantiles.items() if 0 < float(q) < 1)
    return _level_bins([q for q, _ in inner], [v for _, v in inner])


def _level_bins(levels: list[float], values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Unique edges from quantile ``values`` at ``levels``; a tied edge keeps its highest level (its mass)."""
    import numpy as np

    cut: dict[float, float] = {}
    for level, value in zip(levels, values, strict=True):
        cut[value] = max(level, cut.get(value, 0.0))
    edges = np.array(sorted(cut))
    cumulative = np.array([0.0, *(cut[e] for e in edges), 1.0])
    return edges, np.diff(cumulative)


def _bin_labels(edges: np.ndarray) -> list[str]:
    bounds = ["-inf", *(f"{e:.6g}" for e in edges), "inf"]
    return [f"({lo}, {hi}]" if hi != "inf" else f"({lo}, inf)" for lo, hi in zip(bounds, bounds[1:], strict=False)]


def _category_values(series: pd.Series) -> Counter[str]:
    """The counts of the present values as the profile keys them: text cut to 100 characters, whole floats
    without ``.0`` (a categorical input captured as a number), booleans as Arrow writes them. Counted per
    distinct value first: a million rows hold a few distinct ones."""
    counts: Counter[str] = Counter()
    for value, n in series.value_counts(dropna=True).items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, float) and value.is_integer():
            text = str(int(value))
        else:
            text = str(value)
        counts[text[:MAX_VALUE_CHARS]] += int(n)
    return counts


def _share_missing(series: pd.Series) -> float:
    return float(series.isna().mean()) if len(series) else 0.0


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
