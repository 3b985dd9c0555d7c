"""What the model server counts: Prometheus series for ``/metrics`` and per-variant statistics for ``/admin/stats``.

Every series a request touches is a metric child bound once (when a model set is loaded), so the request path
increments a bound counter instead of looking labels up. The ``/admin/stats`` statistics are plain Python
counters and a bounded window of latencies, replaced on every reload (the canary is judged on its own traffic).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from kiln.tasks.serving.monitor_gauges import MonitorFigures

#: ``Content-Type`` of the ``/metrics`` response.
METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Latencies kept per variant for the ``/admin/stats`` percentiles.
STATS_WINDOW = 10_000
#: Request latency buckets in seconds: sub-millisecond model calls up to requests that queue behind big batches.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Rows per forward pass.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
#: The HTTP statuses a request that reached a model can end with.
MODEL_STATUSES = ("200", "422", "500")
#: The statuses of requests refused before a model was chosen.
REFUSED_STATUSES = ("401", "403", "413", "422", "503")
#: The statuses of ``POST /feedback`` (503: the feedback buffer is full, or no model is loaded).
FEEDBACK_STATUSES = ("200", "401", "403", "404", "413", "422", "503")
#: Why captured records or feedback rows were dropped: the buffer was full, or their flush failed.
DROP_REASONS = ("full", "flush_failed", "feedback_full", "feedback_flush_failed")
#: Seconds between two log lines about the same kind of recurring failure (each one is counted in the metrics).
FAILURE_LOG_INTERVAL_S = 10.0


class ThrottledLog:
    """Logs a recurring failure at most once per ``interval_s``, with the number of occurrences since the last line
    (under load a broken model fails thousands of requests a second; each is counted in the metrics anyway).

    Args:
        logger: where the lines go.
        level: their level (``logging.WARNING``...).
        interval_s: the least time between two lines.
    """

    def __init__(self, logger: logging.Logger, level: int, interval_s: float = FAILURE_LOG_INTERVAL_S):
        self.logger = logger
        self.level = level
        self.interval_s = interval_s
        self._logged_at = -interval_s
        self._unlogged = 0

    def __call__(self, message: str, *args: Any, exc_info: BaseException | None = None) -> None:
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at < self.interval_s:
            return
        self.logger.log(self.level, message + " (%d time(s) since the last such line)", *args, self._unlogged,
                        exc_info=exc_info)
        self._logged_at, self._unlogged = now, 0


@dataclass(frozen=True)
class VariantMetrics:
    """The bound metric children of one served variant (``champion`` or ``canary``) and version."""

    ok: Any
    """Requests answered 200 by this variant."""
    invalid: Any
    """Requests refused with 422 by this variant's feature transform."""
    failed: Any
    """Requests answered 500 (a model failure of the champion)."""
    latency: Any
    """Request duration histogram of this variant."""
    batch_rows: Any
    """Rows per forward pass of this variant."""
    records: Any
    """Records predicted by this variant."""
    model_errors: Any
    """Forward passes (or transforms) that raised or returned non-finite values."""


class ServerMetrics:
    """The server's Prometheus registry and metric families.

    Args:
        registry: where to register; a new one by default (so several servers may live in one test process).
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("kiln_serve_requests", "Predict requests that reached a model, by variant, version "
                                "and HTTP status", ["variant", "version", "status"], registry=r)
        self.refused = Counter("kiln_serve_refused_requests", "Predict requests refused before a model was chosen "
                               "(bad token, bad body, too many records, no model)", ["status"], registry=r)
        self.latency = Histogram("kiln_serve_request_duration_seconds", "Predict request duration inside the "
                                 "server, by the variant that answered", ["variant"], buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.batch_rows = Histogram("kiln_serve_batch_rows", "Rows per forward pass (micro-batches of "
                                    "concurrent requests)", ["variant"], buckets=BATCH_BUCKETS, registry=r)
        self.records = Counter("kiln_serve_records_predicted", "Records predicted", ["variant", "version"],
                               registry=r)
        self.model_errors = Counter("kiln_serve_model_errors", "Model failures (exceptions or non-finite outputs) "
                                    "by variant and version; canary failures are retried on the champion",
                                    ["variant", "version"], registry=r)
        self.reloads = Counter("kiln_serve_reloads", "Deployment reloads by outcome", ["outcome"], registry=r)
        self.loaded = Gauge("kiln_serve_model_loaded", "1 for each served variant and version", ["variant",
                            "version"], registry=r)
        self.canary_share = Gauge("kiln_serve_canary_share", "Share of requests routed to the canary (0: none)",
                                  registry=r)
        self.in_flight = Gauge("kiln_serve_in_flight", "Predict requests being answered now (an autoscaling "
                               "signal: a Kubernetes HPA reads it through the Prometheus Adapter)", registry=r)
        self.refused_by_status = {s: self.refused.labels(s) for s in REFUSED_STATUSES}
        self.connections_ended = Counter(
            "kiln_serve_connections_ended_by_limit", "Connections a limit ended before the app saw their request: "
            "408 (headers or body too slow), 413 (body too large), 503 (connection cap, all busy), evicted (closed "
            "idle at the connection cap)", ["reason"], registry=r)
        self._ended_by_reason = {reason: self.connections_ended.labels(reason)
                                 for reason in ("408", "413", "503", "evicted")}
        self.reloads_ok = self.reloads.labels("ok")
        self.reloads_failed = self.reloads.labels("failed")
        self._loaded_labels: list[tuple[str, str]] = []
        self._add_capture_metrics(r)

    def _add_capture_metrics(self, r: CollectorRegistry) -> None:
        """The series of traffic capture and feedback (:mod:`.capture`)."""
        self.capture_records = Counter("kiln_capture_records", "Predicted records captured for monitoring "
                                       "(taken into the capture buffer)", registry=r)
        dropped = Counter("kiln_capture_dropped", "Captured records (or feedback rows, reasons feedback_*) "
                          "dropped: the buffer was full, or the flush that wrote them failed", ["reason"], registry=r)
        self.capture_dropped = {reason: dropped.labels(reason) for reason in DROP_REASONS}
        flushes = Counter("kiln_capture_flushes", "Files of captured records or feedback written to the artifact "
                          "store, by outcome", ["status"], registry=r)
        self.capture_flushes = {status: flushes.labels(status) for status in ("ok", "failed")}
        self.capture_buffered = Gauge("kiln_capture_buffered_records", "Captured records and feedback rows held in "
                                      "memory, not yet written", registry=r)
        self.capture_oldest_age = Gauge("kiln_capture_oldest_age_seconds", "Age of the oldest captured record or "
                                        "feedback row not yet written (grows when capture falls behind)", registry=r)
        feedback = Counter("kiln_feedback", "Feedback requests (POST /feedback) by HTTP status", ["status"],
                           registry=r)
        self.feedback = {status: feedback.labels(status) for status in FEEDBACK_STATUSES}

    def watch_capture(self, buffered: Callable[[], float], oldest_age_s: Callable[[], float]) -> None:
        """Read the capture gauges from these functions when ``/metrics`` is scraped (nothing on the request path).

        Args:
            buffered: the records and feedback rows held now.
            oldest_age_s: seconds since the oldest of them was taken (0 when none).
        """
        self.capture_buffered.set_function(buffered)
        self.capture_oldest_age.set_function(oldest_age_s)

    def watch_in_flight(self, count: Callable[[], float]) -> None:
        """Read ``kiln_serve_in_flight`` from ``count`` when ``/metrics`` is scraped (nothing on the request path
        but the caller's own counter)."""
        self.in_flight.set_function(count)

    def watch_monitor(self, figures: Callable[[], MonitorFigures | None]) -> None:
        """Expose the monitor's latest figures (:mod:`.monitor_gauges`) as the ``kiln_monitor_*`` gauges, read from
        ``figures`` when ``/metrics`` is scraped; ``None`` exposes none of them.

        Args:
            figures: the figures to show now.
        """
        self.registry.register(_MonitorCollector(figures))

    def count_connection_ended(self, reason: str) -> None:
        """Count a connection ended by a limit (the protocol's ``on_refused``)."""
        self._ended_by_reason[reason].inc()

    def bind(self, variant: str, version: str) -> VariantMetrics:
        """The metric children of ``variant`` serving ``version`` (created at zero, so they show before use)."""
        return VariantMetrics(
            ok=self.requests.labels(variant, version, "200"),
            invalid=self.requests.labels(variant, version, "422"),
            failed=self.requests.labels(variant, version, "500"),
            latency=self.latency.labels(variant), batch_rows=self.batch_rows.labels(variant),
            records=self.records.labels(variant, version), model_errors=self.model_errors.labels(variant, version))

    def set_loaded(self, versions: dict[str, str], canary_share: float) -> None:
        """Publish which versions are served now (``{"champion": "3", "canary": "4"}``) and the canary share."""
        for labels in self._loaded_labels:
            self.loaded.remove(*labels)
        self._loaded_labels = list(versions.items())
        for variant, version in self._loaded_labels:
            self.loaded.labels(variant, version).set(1)
        self.canary_share.set(canary_share)

    def render(self) -> bytes:
        """The Prometheus text exposition of every series."""
        return generate_latest(self.registry)


class _MonitorCollector(Collector):
    """The ``kiln_monitor_*`` gauges of the monitor's latest run, every series labelled with the pipeline."""

    def __init__(self, figures: Callable[[], MonitorFigures | None]):
        self.figures = figures

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families(None))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        # Only families with samples: without figures, /metrics names no monitor series at all.
        return (family for family in self._families(self.figures()) if family.samples)

    @staticmethod
    def _families(f: MonitorFigures | None) -> list[GaugeMetricFamily]:
        families = {
            "psi": GaugeMetricFamily("kiln_monitor_feature_psi", "PSI of a live input feature against the training "
                                     "baseline, in the monitor's latest window", labels=["pipeline", "feature"]),
            "drift": GaugeMetricFamily("kiln_monitor_feature_drift", "1 when the monitor's latest run found the "
                                       "feature drifted (PSI and test both past their thresholds)",
                                       labels=["pipeline", "feature"]),
            "prediction": GaugeMetricFamily("kiln_monitor_prediction_psi", "PSI of the live predictions against "
                                            "the test split's", labels=["pipeline"]),
            "live": GaugeMetricFamily("kiln_monitor_quality_live", "The primary metric on the labelled live rows",
                                      labels=["pipeline", "metric"]),
            "baseline": GaugeMetricFamily("kiln_monitor_quality_baseline", "The primary metric on the test split "
                                          "at training time", labels=["pipeline", "metric"]),
            "breach": GaugeMetricFamily("kiln_monitor_breach", "1 when the monitor's latest run found a breach "
                                        "(drift or quality)", labels=["pipeline"]),
            "rows": GaugeMetricFamily("kiln_monitor_rows", "Captured rows in the monitor's latest window",
                                      labels=["pipeline"]),
            "last_run": GaugeMetricFamily("kiln_monitor_last_run_timestamp_seconds", "When the monitor's latest run "
                                          "finished (Unix time)", labels=["pipeline"]),
            "canary_breach": GaugeMetricFamily("kiln_monitor_canary_breach", "1 when the monitor's latest run found "
                                               "the canary's traffic drifted or its quality worse (than its test "
                                               "figure or the champion's live one)", labels=["pipeline", "version"]),
            "canary_rows": GaugeMetricFamily("kiln_monitor_canary_rows", "The canary's captured rows in the "
                                             "monitor's latest window", labels=["pipeline", "version"]),
            "canary_live": GaugeMetricFamily("kiln_monitor_canary_quality_live", "The primary metric on the "
                                             "canary's labelled live rows", labels=["pipeline", "version", "metric"]),
        }
        if f is None:
            return list(families.values())
        p = [f.pipeline]
        for name, feature in f.features.items():
            if feature.psi is not None:
                families["psi"].add_metric([*p, name], feature.psi)
            families["drift"].add_metric([*p, name], float(feature.drift))
        if f.prediction_psi is not None:
            families["prediction"].add_metric(p, f.prediction_psi)
        if f.quality is not None:
            for key, value in (("live", f.quality.live), ("baseline", f.quality.baseline)):
                if value is not None:
                    families[key].add_metric([*p, f.quality.metric], value)
        families["breach"].add_metric(p, float(f.breach))
        families["rows"].add_metric(p, f.rows)
        families["last_run"].add_metric(p, f.finished_at)
        if f.canary is not None:
            c = [*p, f.canary.version]
            families["canary_breach"].add_metric(c, float(f.canary.breach))
            families["canary_rows"].add_metric(c, f.canary.rows)
            if f.canary.live is not None and f.canary.metric is not None:
                families["canary_live"].add_metric([*c, f.canary.metric], f.canary.live)
        return list(families.values())


class VariantStats:
    """Requests, errors and a window of latencies of one variant since the last reload (``/admin/stats``).

    Args:
        version: the served version.
        window: how many latest latencies the percentiles are computed over.
    """

    __slots__ = ("version", "requests", "errors", "latencies_ms")

    def __init__(self, version: str, window: int = STATS_WINDOW):
        self.version = version
        self.requests = 0
        self.errors = 0
        self.latencies_ms: deque[float] = deque(maxlen=window)

    def to_dict(self) -> dict[str, Any]:
        """``{"version", "requests", "errors", "p50_ms", "p99_ms"}``; percentiles are ``None`` before traffic."""
        ordered = sorted(self.latencies_ms)
        return {"version": self.version, "requests": self.requests, "errors": self.errors,
                "p50_ms": _percentile(ordered, 50), "p99_ms": _percentile(ordered, 99)}


def _percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted values, rounded to microseconds."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return round(ordered[rank - 1], 3)
