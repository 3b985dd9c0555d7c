"""The ``monitoring:`` section of a pipeline spec: when the served model is watched, what counts as a drift or a
quality breach, and what a breach does (README "Monitoring").

The drift thresholds' defaults and bounds are :class:`kiln.tasks.monitoring.drift.DriftThresholds`'s (one
declaration): a field here takes its default from there, and a value is checked by building the thresholds. The
drift module is imported when a spec is validated, not when this one is (it imports the feature profile, which
imports the spec's column types).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from kiln.tasks.spec.base import CLASSIFICATION_METRICS, MAX_COUNT, REGRESSION_METRICS, _Strict

if TYPE_CHECKING:
    from kiln.tasks.monitoring.drift import DriftThresholds


def _thresholds(**values: Any) -> DriftThresholds:
    from kiln.tasks.monitoring.drift import DriftThresholds

    return DriftThresholds(**values)


def _default(name: str) -> Callable[[], Any]:
    """The default of ``name``: drift.py's."""
    return lambda: getattr(_thresholds(), name)


def check_cron(value: str | None) -> str | None:
    """A cron expression or preset, as Airflow's ``CronTriggerTimetable`` takes it (``None`` passes).

    Raises:
        ValueError: not a cron expression nor a preset.
    """
    from croniter import croniter

    if value is not None and not croniter.is_valid(value):
        raise ValueError(f"{value!r} is not a cron expression ('minute hour day month weekday', e.g. '0 3 * * *') "
                         "or a preset (@hourly, @daily, @weekly, @monthly, @yearly)")
    return value


Cron = Annotated[str, AfterValidator(check_cron)]


def _threshold(value: Any, info: ValidationInfo) -> Any:
    """Check one threshold with drift.py's own bounds (the message without the repeated field name)."""
    name = str(info.field_name)
    try:
        _thresholds(**{name: value})
    except ValueError as exc:
        raise ValueError(str(exc).removeprefix(f"{name}: ")) from None
    return value


class DriftSpec(_Strict):
    """When a feature's (or the predictions') distribution counts as drifted: both figures must say so."""

    psi_threshold: float = Field(default_factory=_default("psi_threshold"))
    """PSI at or above which a distribution moved enough to matter (> 0; 0.1-0.2 is the usual "watch" band)."""
    p_value: float = Field(default_factory=_default("p_value"))
    """The KS or chi-square test's p-value below which the move is not chance (in (0, 1))."""
    min_rows: int = Field(default_factory=_default("min_rows"), le=MAX_COUNT)
    """Fewer live values than this: no verdict ("not enough traffic")."""

    @field_validator("psi_threshold", "p_value", "min_rows")
    @classmethod
    def _bounds(cls, value: Any, info: ValidationInfo) -> Any:
        return _threshold(value, info)


class QualitySpec(_Strict):
    """The live metric, on captured rows whose labels came back, against the served model's test figure."""

    metric: str | None = None
    """The metric compared (one ``evaluate`` computes for the task); default: the pipeline's primary metric."""
    max_metric_drop: float = Field(default_factory=_default("max_metric_drop"))
    """A breach when the live metric is worse than the test figure by more than this, in the metric's units."""
    min_labels: int = Field(default_factory=_default("min_rows"), le=MAX_COUNT)
    """Fewer labelled rows than this: no quality verdict."""

    @field_validator("max_metric_drop")
    @classmethod
    def _bounds(cls, value: Any, info: ValidationInfo) -> Any:
        return _threshold(value, info)

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str | None) -> str | None:
        known = (*CLASSIFICATION_METRICS, *REGRESSION_METRICS)
        if value is not None and value not in known:
            raise ValueError(f"unknown metric {value!r}; allowed: {', '.join(known)}")
        return value

    @field_validator("min_labels")
    @classmethod
    def _min_labels(cls, value: int) -> int:
        try:
            _thresholds(min_rows=value)
        except ValueError:
            raise ValueError(f"{value!r} is not allowed (must be an integer >= 1)") from None
        return value


class RetrainSpec(_Strict):
    """How a breach with ``on_breach: retrain`` starts the pipeline's own gated run."""

    cooldown_hours: int = Field(default=24, ge=0, le=720)
    """After a retrain request, further breaches request none for this long (no retraining storms)."""
    append_labelled: bool = False
    """Retrain on the source's current data plus the captured rows whose labels came back: each monitor run exports
    the labelled rows of its window received since the last retrain request (the model's inputs as captured and
    the label as the target; at most :data:`kiln.tasks.monitoring.labelled.MAX_LABELLED_ROWS`, the newest) to
    ``labelled.parquet`` in its report folder, the retrain event names that file, and the triggered run's ``ingest``
    appends its rows to the snapshot, cast to the snapshot's column types. ``false``: the source's data only."""


class MonitoringSpec(_Strict):
    """A monitor DAG (``<pipeline>_monitor``) compares the served model's captured traffic with its training
    baseline on a schedule, and on a breach alerts or requests a retrain."""

    schedule: Cron = "@hourly"
    """When the monitor runs: a cron expression (UTC) or a preset."""
    window_hours: int = Field(default=24, ge=1, le=720)
    """The captured traffic of this many hours before each monitor run is judged."""
    drift: DriftSpec = Field(default_factory=DriftSpec)
    """When a feature's or the predictions' distribution counts as drifted."""
    quality: QualitySpec = Field(default_factory=QualitySpec)
    """When the live metric, where labels came back, is a breach."""
    on_breach: Literal["alert", "retrain"] = "alert"
    """``alert``: the breach is reported (report, ``latest.json``, gauges and alert rules) and nothing else;
    ``retrain``: the monitor also emits the pipeline's retrain Asset event, which starts a gated run."""
    retrain: RetrainSpec = RetrainSpec()
    """The cool-down between retrain requests, and whether the labelled captured rows join the retraining data."""
    validate_live: bool = True
    """Check the live inputs with the spec's declared expectations that do not name the target (into the report)."""

    def thresholds(self) -> DriftThresholds:
        """The thresholds the drift figures are judged by (quality needs ``quality.min_labels`` rows instead of
        ``min_rows``: :func:`kiln.tasks.monitoring.run.run_monitor` swaps it in)."""
        return _thresholds(psi_threshold=self.drift.psi_threshold, p_value=self.drift.p_value,
                               min_rows=self.drift.min_rows, max_metric_drop=self.quality.max_metric_drop)
