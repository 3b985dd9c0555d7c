"""The spec sections of the release steps: ``evaluation`` (the metrics, the gate's thresholds and rules) and
``deployment`` (infra validation, the strategy, the canary)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from kiln.tasks.serving.scaling import ReplicaSettings
from kiln.tasks.spec.base import DAY_S, MAX_COUNT, _Strict


class SliceSpec(_Strict):
    """A per-slice check of the gate: the test rows are grouped by one raw column's values."""

    column: str = Field(min_length=1)
    """A raw input column (categorical or with few values); each value is a slice."""
    min_rows: int = Field(default=20, ge=1, le=MAX_COUNT)
    """Slices with fewer test rows are reported as skipped, never failed (too few rows to judge)."""
    thresholds: dict[str, float] = Field(default_factory=dict)
    """Per-slice metric thresholds, in each metric's direction like ``evaluation.thresholds``."""
    max_regression: float | None = Field(default=None, ge=0)
    """On the primary metric: a slice may trail the champion's value on the same slice by at most this."""

    @model_validator(mode="after")
    def _checks_something(self) -> SliceSpec:
        if not self.thresholds and self.max_regression is None:
            raise ValueError(f"the slice check on column '{self.column}' checks nothing; set thresholds and/or "
                             "max_regression")
        return self


class GateSpec(_Strict):
    """How the ``gate`` step compares a candidate with the thresholds and with the current champion."""

    margin: float = Field(default=0.0, ge=0)
    """The candidate may trail the champion on the primary metric by at most this (0: it must tie or beat it)."""
    method: Literal["point", "bootstrap"] = "point"
    """``point`` compares metrics on the test split; ``bootstrap`` compares one-sided confidence bounds from a
    paired bootstrap over the test rows (stricter on small test sets)."""
    bootstrap_samples: int = Field(default=1000, ge=100, le=100_000)
    """Resamples of the test rows (``bootstrap`` only)."""
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    """One-sided confidence level of the bootstrap bounds."""
    slices: list[SliceSpec] = Field(default_factory=list)
    """Checks per value of a raw column, at most one per column."""

    @model_validator(mode="after")
    def _one_check_per_column(self) -> GateSpec:
        columns = [s.column for s in self.slices]
        if len(set(columns)) != len(columns):
            raise ValueError(f"slices names a column more than once ({columns}); merge those checks")
        return self


class EvaluationSpec(_Strict):
    """The ``evaluate`` step's metrics and the thresholds the gate applies later."""

    primary_metric: str | None = None
    """The metric models are compared on; default ``accuracy`` (classification) or ``rmse`` (regression)."""
    thresholds: dict[str, float] = Field(default_factory=dict)
    """Minimum (or, for error metrics, maximum) values a candidate must reach, by metric name."""
    gate: GateSpec = Field(default_factory=GateSpec)


class CanarySpec(_Strict):
    """The ``canary`` deployment strategy: a share of live traffic goes to the candidate until it is judged."""

    share: float = Field(default=0.2, gt=0, lt=1)
    """Share of requests routed to the candidate."""
    min_requests: int = Field(default=50, ge=1, le=MAX_COUNT)
    """Requests the candidate must serve before it can be promoted."""
    window_s: float = Field(default=300, gt=0, le=30 * DAY_S)
    """The candidate is rolled back if it has not served ``min_requests`` within this time."""
    max_error_rate_increase: float = Field(default=0.01, ge=0, le=1)
    """Rolled back if its error rate exceeds the champion's by more than this."""
    max_latency_ratio: float = Field(default=2.0, ge=1)
    """Rolled back if its p99 latency exceeds the champion's by more than this factor."""


class InfraValidationSpec(_Strict):
    """The ``infra_validate`` step: the bundle is loaded in the serving runtime before it is deployed."""

    tolerance: float = Field(default=1e-5, gt=0)
    """Largest allowed difference between served and training-side predictions (train/serve parity): absolute
    for class probabilities, relative to the value for regression values above 1."""
    latency_budget_ms: float = Field(default=500.0, gt=0)
    """p99 latency of one-row requests allowed in the serving runtime. The default only catches a runtime that is
    broken-slow (seconds per row) on a busy laptop; set your service's objective here (the serving benchmark
    measures p99 of 8-13 ms on 2 cores)."""
    requests: int = Field(default=50, ge=1, le=10_000)
    """One-row requests replayed to time it."""


def _default_capture_share() -> float:
    # The model server's own default (one declaration), imported when a spec is validated.
    from kiln.tasks.serving.deployment import DEFAULT_CAPTURE_SHARE

    return DEFAULT_CAPTURE_SHARE


class DeploymentSpec(_Strict):
    """What happens after a candidate passes the gate."""

    strategy: Literal["direct", "canary", "none"] = Field(default="direct", title="Deployment")
    """``direct`` swaps the served model at once; ``canary`` sends a share of traffic to the candidate and promotes
    or rolls it back on its error rate and latency; ``none`` moves the registry alias only (no endpoint)."""
    port: int | None = Field(default=None, ge=1, le=65_535)
    """Port of this pipeline's model server on the embedded default; default ``KILN_SERVE_PORT``. Pipelines that
    are served at the same time need different ports."""
    canary: CanarySpec = Field(default_factory=CanarySpec)
    infra_validation: InfraValidationSpec = Field(default_factory=InfraValidationSpec)
    capture_share: float = Field(default_factory=lambda: _default_capture_share(), ge=0, le=1)
    """Share of the answered requests the model server captures for monitoring (README "Monitoring"), in [0, 1];
    0 turns capture off. Written into the deployment file on every deploy."""
    replicas: ReplicaSettings | None = None
    """Serve the model with replicas behind a load balancer (README "Serving at scale"): ``{min, max}`` and the
    autoscaling settings of ``kiln.tasks.serving.scaling.ReplicaSettings``; unset: one server process. Written
    into the deployment file on every deploy."""

    @field_validator("replicas", mode="before")
    @classmethod
    def _replica_settings(cls, value: object) -> object:
        # Declared once, in the serving package (the fleet reads the same fields from the deployment file).
        return ReplicaSettings.from_dict(value) if isinstance(value, dict) else value
