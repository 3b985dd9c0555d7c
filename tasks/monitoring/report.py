"""The monitor report of one window: JSON a program reads, HTML a person reads.

:func:`build_report` puts the pieces together: the captured rows (:mod:`.window`), drift per feature and on the
predictions (:mod:`.drift`), the live quality where labels came back (:mod:`.quality`), and the batches that were
skipped. A window without traffic says so and claims no drift; one with fewer than ``min_rows`` rows gives figures
but no verdicts ("not enough traffic").
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.tasks.monitoring.drift import DriftThresholds, FeatureDrift, feature_drift, prediction_drift
from kiln.tasks.monitoring.quality import Quality, live_quality
from kiln.tasks.monitoring.window import SkippedFile, WindowRead, join_labels
from kiln.tasks.storage.artifacts import atomic_write_bytes, write_json

if TYPE_CHECKING:
    from kiln.tasks.bundle.baseline import Baseline

log = logging.getLogger(__name__)

FORMAT = 1
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"


@dataclass
class MonitorReport:
    """What one monitor run found."""

    pipeline: str
    versions: list[str]
    start: datetime
    end: datetime
    rows: int
    """Captured rows in the window."""
    thresholds: DriftThresholds
    features: list[FeatureDrift] = field(default_factory=list)
    prediction: FeatureDrift | None = None
    quality: Quality | None = None
    files_read: int = 0
    skipped: list[SkippedFile] = field(default_factory=list)
    """Captured and feedback batches left out, with the reason."""
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def no_traffic(self) -> bool:
        """No captured row in the window (no drift is claimed)."""
        return self.rows == 0

    @property
    def traffic(self) -> str:
        """``no traffic``, ``not enough traffic`` (no verdicts) or ``ok``."""
        if self.no_traffic:
            return "no traffic"
        return "not enough traffic" if self.rows < self.thresholds.min_rows else "ok"

    @property
    def drifted(self) -> list[str]:
        """The features that drifted, in the baseline's column order."""
        return [f.column for f in self.features if f.drifted]

    @property
    def breached(self) -> bool:
        """A feature or the predictions drifted, or the quality fell too far: the monitor acts on this."""
        return bool(self.drifted) or (self.prediction is not None and self.prediction.drifted) or \
            (self.quality is not None and self.quality.breached)

    def summary(self) -> str:
        """One line for logs and the page's heading."""
        if self.no_traffic:
            return f"{self.pipeline}: no traffic in the window: no drift claimed"
        parts = [f"{self.rows} rows"]
        if self.traffic != "ok":
            parts.append(f"not enough traffic (min_rows {self.thresholds.min_rows}): no drift verdicts")
        else:
            parts.append(f"drift on {', '.join(self.drifted)}" if self.drifted else "no feature drift")
            if self.prediction is not None and self.prediction.drifted:
                parts.append("prediction drift")
        if self.quality is not None and self.quality.status in ("breach", "ok"):
            parts.append(f"quality {self.quality.status}: {self.quality.metric} {self.quality.live:.4f} "
                         f"(test {self.quality.baseline:.4f})")
        if self.skipped:
            parts.append(f"{len(self.skipped)} batch(es) skipped")
        return f"{self.pipeline}: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (``report.json``)."""
        return {"format": FORMAT, "pipeline": self.pipeline, "versions": list(self.versions),
                "window": {"start": self.start.isoformat(), "end": self.end.isoformat()},
                "rows": self.rows, "traffic": self.traffic, "no_traffic": self.no_traffic,
                "breached": self.breached, "drifted": self.drifted, "summary": self.summary(),
                "thresholds": self.thresholds.to_dict(),
                "features": {f.column: f.to_dict() for f in self.features},
                "prediction": self.prediction.to_dict() if self.prediction is not None else None,
                "quality": self.quality.to_dict() if self.quality is not None else None,
                "files": {"read": self.files_read, "skipped": [s.to_dict() for s in self.skipped]},
                "created_at": self.created_at}


def build_report(pipeline: str, versions: list[str], captures: WindowRead, baseline: Baseline,
                 thresholds: DriftThresholds, feedback: WindowRead | None = None) -> MonitorReport:
    """Compare a window's captured rows with the served bundle's baseline.

    Args:
        pipeline: the pipeline.
        versions: the served versions the window was read for.
        captures: :func:`~kiln.tasks.monitoring.window.read_captures`'s result.
        baseline: the served bundle's baseline (:func:`kiln.tasks.bundle.baseline.load_baseline`); its sample is
            read for the KS tests when its file exists.
        thresholds: when a figure is a drift or a breach.
        feedback: :func:`~kiln.tasks.monitoring.window.read_feedback`'s result; ``None``: no quality figures.

    Returns:
        The report. Without traffic, its features and predictions carry no figures (no drift is claimed).
    """
    report = MonitorReport(pipeline, list(versions), captures.start, captures.end, captures.rows, thresholds,
                           files_read=len(captures.files) + (len(feedback.files) if feedback else 0),
                           skipped=[*captures.skipped, *(feedback.skipped if feedback else [])])
    if report.no_traffic:
        log.info("%s", report.summary())
        return report
    sample = None
    if Path(baseline.sample_path).is_file():
        import pandas as pd

        numeric = [c for c, p in baseline.profile.columns.items() if p.kind == "numeric"]
        sample = pd.read_parquet(baseline.sample_path, columns=numeric)
    report.features = feature_drift(baseline.profile, sample, captures.frame, thresholds)
    report.prediction = prediction_drift(baseline.predictions, captures.frame, thresholds)
    if feedback is not None:
        report.quality = live_quality(join_labels(captures.frame, feedback.frame), baseline.predictions,
                                      baseline.metrics, thresholds)
    log.info("%s", report.summary())
    return report


def write_report(report: MonitorReport, folder: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into ``folder`` (each atomically).

    Returns:
        The JSON file and the HTML file.
    """
    folder = Path(folder)
    json_path = write_json(folder / REPORT_JSON, report.to_dict())
    html_path = atomic_write_bytes(folder / REPORT_HTML, render_html(report).encode())
    return json_path, html_path


def render_html(report: MonitorReport, sections: Sequence[str] = ()) -> str:
    """A self-contained HTML page (no scripts): the summary, then features, predictions, quality and files.

    Args:
        report: the figures.
        sections: more HTML, already escaped, placed before the closing thresholds line (the monitor run's notes
            and live expectations).
    """
    e = _escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(report.pipeline)}: monitor report"
             f"</title><style>{_STYLE}</style></head><body>",
             f"<h1>{e(report.pipeline)}: monitor report</h1>", *report_body(report)]
    if report.skipped:
        rows = "".join(f"<tr><td>{e(s.key)}</td><td>{e(s.reason)}</td></tr>" for s in report.skipped)
        parts.append(f"<h2>Skipped batches</h2><table><tr><th>batch</th><th>reason</th></tr>{rows}</table>")
    parts += sections
    t = report.thresholds
    parts.append(f"<p class='small'>A feature drifts when PSI &gt;= {t.psi_threshold:g} and its test's p-value "
                 f"&lt; {t.p_value:g}, over at least {t.min_rows} values; quality breaches when the primary metric "
                 f"falls by more than {t.max_metric_drop:g}. {report.files_read} batches read. Made "
                 f"{e(report.created_at)}.</p></body></html>")
    return "\n".join(parts)


def report_body(report: MonitorReport, level: int = 2) -> list[str]:
    """The page's figures of ``report`` (summary, window, drift tables, quality), headings at ``level``: the whole
    page's body, and the canary's section of it (:mod:`.run`)."""
    e, h = _escape, f"h{level}"
    parts = [f"<p class='{'bad' if report.breached else 'good'}'><b>{e(report.summary())}</b></p>",
             f"<p>Window {e(report.start.isoformat())} to {e(report.end.isoformat())}; versions "
             f"{e(', '.join(report.versions))}; {report.rows} captured rows; traffic: {e(report.traffic)}.</p>"]
    if report.no_traffic:
        parts.append("<p>No captured traffic in this window: nothing to compare, no drift claimed.</p>")
    if report.features:
        parts += [f"<{h}>Input drift</{h}>", _drift_table(report.features)]
    if report.prediction is not None:
        parts += [f"<{h}>Prediction drift</{h}>", _drift_table([report.prediction])]
    if report.quality is not None:
        parts += [f"<{h}>Quality</{h}>", f"<p>{e(report.quality.status)}: {e(report.quality.message)}</p>"]
    return parts


def _drift_table(items: list[FeatureDrift]) -> str:
    e = _escape
    head = ("<table><tr><th>column</th><th>verdict</th><th>values</th><th>PSI</th><th>test</th><th>p-value</th>"
            "<th>missing (live / training)</th><th>bins: training / live share</th></tr>")
    rows = []
    for f in items:
        bins = "".join(f"<tr><td>{e(b['bin'])}</td><td>{b['baseline']:.3f}</td><td>{b['live']:.3f}</td></tr>"
                       for b in f.bins)
        detail = f"<details><summary>{len(f.bins)} bins</summary><table>{bins}</table></details>" if f.bins else ""
        rows.append(f"<tr class='{'bad' if f.drifted else ''}'><td>{e(f.column)}</td><td title='{e(f.message)}'>"
                    f"{e(f.status)}</td><td>{f.rows}</td><td>{_num(f.psi)}</td><td>{e(f.test or '')}</td>"
                    f"<td>{_num(f.p_value)}</td><td>{_num(f.missing_share)} / {_num(f.baseline_missing_share)}</td>"
                    f"<td>{detail}</td></tr>")
    return head + "".join(rows) + "</table>"


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


def _escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:.5em 0}"
          "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}"
          ".bad{color:#a00}.good{color:#060}.small{font-size:.85em;color:#555}")
