"""The ``gate`` step's decision: may a candidate model replace the champion?

A candidate passes when it meets the spec's thresholds, is no worse than the champion on the primary metric
(within ``margin``) when both are scored on the same test rows, and passes the optional per-slice checks. The first
model (no champion) passes on thresholds and slice thresholds alone. With ``method="bootstrap"`` the global checks
use one-sided confidence bounds from a paired bootstrap over test rows instead of point estimates; slice checks
always use point estimates, since a bound over a few dozen rows is too wide to be useful.

This module is pure logic: recording the decision (versions, run ids, MLflow) is the caller's job.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, get_args

import numpy as np
import pandas as pd

from kiln.tasks.evaluation.metrics import compute_metrics
from kiln.tasks.evaluation.resampling import resampled_metrics
from kiln.tasks.spec import HIGHER_IS_BETTER, GateSpec, PipelineSpec, TaskType
from kiln.tasks.spec.base import metric_problem

log = logging.getLogger(__name__)

#: A bootstrap check fails when fewer than this share of the resamples define its metric.
MIN_VALID_FRACTION = 0.5
#: A slice column with more distinct values than this is rejected (it is not categorical).
MAX_SLICE_VALUES = 100
#: Resampled rows held in memory at once (resamples x test rows), to bound memory on large test sets.
_CHUNK_CELLS = 2_000_000
#: ``candidate - champion`` carries float rounding, so a tie exactly at the margin would fail without this slack.
_TOLERANCE = 1e-12
#: Bootstrap values per metric: the candidate's, and the champion's (None without a champion).
_Samples = tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]


@dataclass(frozen=True)
class GateConfig:
    """Settings of the gate's decision: the spec's ``evaluation`` settings for one task."""

    task: TaskType
    """``classification`` or ``regression``."""
    primary_metric: str
    """The metric the candidate is compared with the champion on (plain name, e.g. ``accuracy``)."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """``evaluation.thresholds``: per plain metric name, the minimum (or, for error metrics, maximum) value."""
    rules: GateSpec = field(default_factory=GateSpec)
    """``evaluation.gate``: margin, method, bootstrap samples and confidence, slice checks (validated there)."""
    seed: int = 0
    """Seed of the bootstrap's random generator; the same seed gives the same decision."""

    def __post_init__(self) -> None:
        if self.task not in get_args(TaskType):
            raise ValueError(f"GateConfig.task must be one of {get_args(TaskType)}, found {self.task!r}")
        slice_metrics = [m for s in self.rules.slices for m in s.thresholds]
        problem = metric_problem(self.task, [self.primary_metric, *self.thresholds, *slice_metrics])
        if problem:
            raise ValueError(f"GateConfig: {problem}")

    @classmethod
    def from_spec(cls, spec: PipelineSpec) -> GateConfig:
        """The config a pipeline spec implies: ``evaluation`` thresholds and ``evaluation.gate``; the bootstrap is
        seeded with ``training.seed`` so that a rerun of the same run decides the same."""
        return cls(task=spec.task, primary_metric=spec.primary_metric, thresholds=dict(spec.evaluation.thresholds),
                   rules=spec.evaluation.gate, seed=spec.training.seed)


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict and every check behind it.

    Each check is ``{"name", "kind", "passed", "skipped", "value", "bound", "limit", "detail"}``. For threshold
    checks ``value`` is the metric and ``limit`` the threshold; for champion and slice-vs-champion checks ``value``
    is the difference ``candidate - champion`` oriented so that positive is better, and ``limit`` is minus the
    allowed margin. ``bound`` is the bootstrap confidence bound compared with ``limit`` (None for point checks).
    A skipped check (``skipped`` true, ``passed`` true) never fails the gate.
    """

    passed: bool
    reason: str
    """One sentence: why it passed or failed, naming the failing checks."""
    checks: list[dict[str, Any]]
    candidate_metrics: dict[str, float]
    """Plain names, point estimates on the full test set."""
    champion_metrics: dict[str, float] | None
    method: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: Python floats, NaN as None."""
        return _jsonable({"passed": self.passed, "reason": self.reason, "checks": self.checks,
                          "candidate_metrics": self.candidate_metrics, "champion_metrics": self.champion_metrics,
                          "method": self.method})


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def decide(config: GateConfig, y_true: np.ndarray, candidate_pred: np.ndarray, champion_pred: np.ndarray | None,
           n_classes: int | None, slice_frame: pd.DataFrame | None = None) -> GateDecision:
    """Decide whether the candidate may replace the champion.

    Args:
        config: the gate's settings.
        y_true: class indices or true values of the test rows, ``[n]``.
        candidate_pred: the candidate's predictions on those rows (``[n, k]`` probabilities or ``[n]`` values).
        champion_pred: the champion's predictions on the same rows, in the candidate's class order; None for the
            first model.
        n_classes: number of classes (None for regression).
        slice_frame: raw input columns of the same rows in the same order; required when ``config.rules.slices`` is set.

    Returns:
        The decision with one entry per check.

    Raises:
        ValueError: predictions that do not fit ``y_true``, or slice checks without a usable ``slice_frame``.
    """
    y_true = np.asarray(y_true)
    candidate_pred = np.asarray(candidate_pred, dtype=np.float64)
    champion_pred = None if champion_pred is None else np.asarray(champion_pred, dtype=np.float64)
    _check_slice_frame(config, slice_frame, len(y_true))
    cand = compute_metrics(config.task, y_true, candidate_pred, n_classes)
    champ = None if champion_pred is None else compute_metrics(config.task, y_true, champion_pred, n_classes)
    samples: _Samples | None = None
    if config.rules.method == "bootstrap":
        samples = _bootstrap(config, y_true, candidate_pred, champion_pred, n_classes)
    checks = [_threshold_check(config, "threshold", f"threshold {m}", m, t, cand, n_classes,
                               None if samples is None else samples[0].get(m), where="")
              for m, t in config.thresholds.items()]
    checks.append(_champion_check(config, cand, champ, n_classes, samples))
    if config.rules.slices:
        assert slice_frame is not None  # checked above
        checks += _slice_checks(config, y_true, candidate_pred, champion_pred, n_classes, slice_frame)
    passed = all(c["passed"] for c in checks)
    reason = _reason(passed, checks, first_model=champion_pred is None)
    for c in checks:
        log.info("gate check %s [%s]: %s", c["name"], "skipped" if c["skipped"] else
                 ("passed" if c["passed"] else "FAILED"), c["detail"])
    log.log(logging.INFO if passed else logging.WARNING, "gate %s", reason)
    return GateDecision(passed=passed, reason=reason, checks=checks, candidate_metrics=cand, champion_metrics=champ,
                        method=config.rules.method)


def _check_slice_frame(config: GateConfig, frame: pd.DataFrame | None, n_rows: int) -> None:
    if not config.rules.slices:
        return
    if frame is None:
        raise ValueError(f"the gate's slices check columns {[s.column for s in config.rules.slices]} but no "
                         "slice_frame was given; pass the raw test rows")
    if len(frame) != n_rows:
        raise ValueError(f"slice_frame has {len(frame)} rows but y_true has {n_rows}; pass the same test rows")
    for s in config.rules.slices:
        if s.column not in frame.columns:
            raise ValueError(f"slice column {s.column!r} is not in slice_frame; present: {', '.join(map(str, frame))}")


def _check(name: str, kind: str, passed: bool, detail: str, value: float | None = None, limit: float | None = None,
           bound: float | None = None, skipped: bool = False) -> dict[str, Any]:
    return {"name": name, "kind": kind, "passed": bool(passed), "skipped": skipped,
            "value": None if value is None else float(value), "bound": None if bound is None else float(bound),
            "limit": None if limit is None else float(limit), "detail": detail}


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _missing(metric: str, n_classes: int | None, where: str) -> str:
    if metric == "roc_auc" and n_classes != 2:
        why = f"it is defined for two classes only (this model has {n_classes})"
    elif metric == "roc_auc":
        why = "it is undefined when the rows hold a single class"
    else:
        why = "it is undefined on a single row"
    return f"{where}{metric} was not computed: {why}"


def _bound_of(samples: np.ndarray, higher_is_better: bool, config: GateConfig) -> tuple[float | None, str]:
    """The one-sided bound of the finite ``samples`` and how many there were; None when too few."""
    valid = samples[np.isfinite(samples)]
    used = f"{len(valid)} of {len(samples)} resamples"
    if len(valid) < MIN_VALID_FRACTION * len(samples):
        return None, f"{used} define it, fewer than {MIN_VALID_FRACTION:.0%}; use more test rows or another metric"
    q = 1 - config.rules.confidence if higher_is_better else config.rules.confidence
    return float(np.quantile(valid, q)), used


def _threshold_check(config: GateConfig, kind: str, name: str, metric: str, threshold: float,
                     metrics: dict[str, float], n_classes: int | None, samples: np.ndarray | None,
                     where: str) -> dict[str, Any]:
    value = metrics.get(metric)
    if value is None:
        return _check(name, kind, False, _missing(metric, n_classes, where), limit=threshold)
    higher = HIGHER_IS_BETTER[metric]
    side, op, miss = ("lower", "≥", "below") if higher else ("upper", "≤", "above")
    bound, used = (None, "") if samples is None else _bound_of(samples, higher, config)
    subject = f"{where}{metric}" + ("" if samples is None else f" {config.rules.confidence * 100:g}% {side} bound")
    if samples is not None and bound is None:
        return _check(name, kind, False, f"{subject} unavailable: only {used}", value=value, limit=threshold)
    compared = value if bound is None else bound
    ok = compared >= threshold if higher else compared <= threshold
    detail = f"{subject} {_fmt(compared)} {op if ok else miss + ' threshold'} {_fmt(threshold)}"
    if bound is not None:
        detail += f" (point {_fmt(value)}; {used})"
    return _check(name, kind, ok, detail, value=value, limit=threshold, bound=bound)


def _champion_check(config: GateConfig, cand: dict[str, float], champ: dict[str, float] | None,
                    n_classes: int | None, samples: _Samples | None) -> dict[str, Any]:
    metric, name = config.primary_metric, f"champion {config.primary_metric}"
    if champ is None:
        return _check(name, "champion", True, "no champion: first model, judged on thresholds only", skipped=True)
    diff_samples = None
    if samples is not None and samples[1] is not None:
        sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
        diff_samples = sign * (samples[0][metric] - samples[1][metric])
    return _compare(config, "champion", name, metric, cand, champ, n_classes, config.rules.margin, "margin",
                    diff_samples, "")


def _compare(config: GateConfig, kind: str, name: str, metric: str, cand: dict[str, float], champ: dict[str, float],
             n_classes: int | None, allowance: float, allowance_name: str, diff_samples: np.ndarray | None,
             where: str) -> dict[str, Any]:
    """Candidate vs champion on ``metric``: the oriented difference (positive = better) must be >= -allowance."""
    c, h, limit = cand.get(metric), champ.get(metric), 0.0 - allowance
    if c is None or h is None:
        whose = "candidate" if c is None else "champion"
        return _check(name, kind, False, f"{_missing(metric, n_classes, where)} (for the {whose}); cannot compare",
                      limit=limit)
    diff = (c - h) if HIGHER_IS_BETTER[metric] else (h - c)
    verb = "beats" if diff > 0 else "matches" if diff == 0 else f"is within {allowance_name} of"
    pair = f"({_fmt(c)} vs {_fmt(h)}, {allowance_name} {_fmt(allowance)})"
    bound, used = (None, "") if diff_samples is None else _bound_of(diff_samples, True, config)
    label = f"{config.rules.confidence * 100:g}% lower bound of the difference"
    if diff_samples is None:
        ok = diff >= limit - _TOLERANCE
        detail = (f"{where}{verb} champion on {metric} {pair}" if ok else f"{where}{metric} {_fmt(c)} trails "
                  f"champion {_fmt(h)} by more than {allowance_name} {_fmt(allowance)}")
    elif bound is None:
        ok, detail = False, f"{where}{metric} vs champion {pair}: {label} unavailable: only {used}"
    else:
        ok = bound >= limit - _TOLERANCE
        detail = (f"{where}{verb} champion on {metric} {pair}; {label} {bound:+.4g} ({used})" if ok else
                  f"{where}{metric} vs champion {pair}: {label} {bound:+.4g} is below {_fmt(limit)} ({used})")
    return _check(name, kind, ok, detail, value=diff, limit=limit, bound=bound)


def _slice_checks(config: GateConfig, y: np.ndarray, cand_pred: np.ndarray, champ_pred: np.ndarray | None,
                  n_classes: int | None, frame: pd.DataFrame) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    for sc in config.rules.slices:
        column = frame[sc.column]
        labels = np.where(column.isna().to_numpy(), "null", column.astype(str).to_numpy())
        values = sorted(set(labels))
        if len(values) > MAX_SLICE_VALUES:
            raise ValueError(f"slice column {sc.column!r} has {len(values)} distinct values (at most "
                             f"{MAX_SLICE_VALUES}); slice on a categorical or low-cardinality column")
        for value in values:
            mask = labels == value
            where, rows = f"slice {sc.column}={value}: ", int(mask.sum())
            if rows < sc.min_rows:
                checks.append(_check(f"slice {sc.column}={value}", "slice", True,
                                     f"{where}skipped, {rows} rows < min_rows {sc.min_rows}", skipped=True))
                continue
            cand = compute_metrics(config.task, y[mask], cand_pred[mask], n_classes)
            checks += [_threshold_check(config, "slice", f"slice {sc.column}={value} {m}", m, t, cand, n_classes,
                                        None, where) for m, t in sc.thresholds.items()]
            if sc.max_regression is None:
                continue
            name = f"slice {sc.column}={value} {config.primary_metric} vs champion"
            if champ_pred is None:
                checks.append(_check(name, "slice", True, f"{where}no champion to compare with", skipped=True))
                continue
            champ = compute_metrics(config.task, y[mask], champ_pred[mask], n_classes)
            checks.append(_compare(config, "slice", name, config.primary_metric, cand, champ, n_classes,
                                   sc.max_regression, "max_regression", None, where))
    return checks


def _reason(passed: bool, checks: list[dict[str, Any]], first_model: bool) -> str:
    if not passed:
        return "failed: " + "; ".join(c["detail"] for c in checks if not c["passed"])
    thresholds = [c["detail"] for c in checks if c["kind"] == "threshold"]
    parts = [f"thresholds met ({', '.join(thresholds)})" if thresholds else "no thresholds set"]
    parts += [c["detail"] for c in checks if c["kind"] == "champion" and not c["skipped"]]
    text = ("first model (no champion); " if first_model else "") + " and ".join(parts)
    slices = [c for c in checks if c["kind"] == "slice"]
    if slices:
        skipped = sum(c["skipped"] for c in slices)
        text += f"; {len(slices) - skipped} slice checks passed, {skipped} skipped"
    return "passed: " + text


def _bootstrap(config: GateConfig, y: np.ndarray, cand_pred: np.ndarray, champ_pred: np.ndarray | None,
               n_classes: int | None) -> _Samples:
    """Paired bootstrap: per metric, its value on each resample of the test rows, for both models alike."""
    cand_names = sorted({*config.thresholds, *([config.primary_metric] if champ_pred is not None else [])})
    if not cand_names:
        return {}, None
    n, total = len(y), config.rules.bootstrap_samples
    rng = np.random.default_rng(config.seed)
    per_chunk = max(1, _CHUNK_CELLS // n)
    cand_parts: list[dict[str, np.ndarray]] = []
    champ_parts: list[dict[str, np.ndarray]] = []
    for start in range(0, total, per_chunk):
        b = min(per_chunk, total - start)
        idx = rng.integers(0, n, size=(b, n))
        # How often each row is drawn in each resample: one matmul per metric then replaces b gathers.
        counts = np.bincount((idx + np.arange(b)[:, None] * n).ravel(), minlength=b * n).reshape(b, n)
        cand_parts.append(resampled_metrics(config.task, y, cand_pred, n_classes, counts, cand_names))
        if champ_pred is not None:
            champ_parts.append(resampled_metrics(config.task, y, champ_pred, n_classes, counts,
                                                 [config.primary_metric]))
    cand = {m: np.concatenate([p[m] for p in cand_parts]) for m in cand_names}
    champ = {config.primary_metric: np.concatenate([p[config.primary_metric] for p in champ_parts])} \
        if champ_pred is not None else None
    return cand, champ
