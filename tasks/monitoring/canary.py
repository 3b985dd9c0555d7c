"""The canary's side of a monitor run: its own traffic judged against its own baseline, and its live quality
against the champion's on the same window.

While a rollout holds a canary (the deployment file's ``canary``), the model server answers a share of the requests
with it and captures them under the canary's version. :func:`kiln.tasks.monitoring.run.run_monitor` reads those rows
apart from the champion's (they were answered by another model: mixed in, they would blur the champion's
prediction and quality figures) and builds a :class:`~kiln.tasks.monitoring.report.MonitorReport` of them against
the canary bundle's baseline; :func:`judge_canary` adds the head-to-head: where both versions have a quality
verdict in the window, the canary breaches when its live metric is worse than the champion's live metric (not its
test figure: the two saw the same traffic) by more than ``max_metric_drop``.

A canary breach is reported and alerted on (``latest.json``'s ``canary``, the ``kiln_monitor_canary_*`` gauges,
the ``KilnCanaryMonitorBreach`` rule). It never asks for a retrain: the canary is the candidate under judgement,
and the rollout's ``verify`` step (error rate and latency against the champion) decides whether it is promoted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.tasks.monitoring.quality import Quality
    from kiln.tasks.monitoring.report import MonitorReport

#: The quality statuses that carry a live figure.
_VERDICTS = ("ok", "breach")


@dataclass(frozen=True)
class VersusChampion:
    """The canary's live metric against the champion's on the labelled rows of the same window."""

    metric: str
    champion: float
    """The champion's live figure."""
    canary: float
    """The canary's live figure."""
    drop: float
    """How much worse the canary is, in the metric's direction (negative: better)."""
    max_drop: float
    """The spec's ``monitoring.quality.max_metric_drop``."""

    @property
    def breached(self) -> bool:
        """The canary is worse than the champion by more than ``max_drop``."""
        return self.drop > self.max_drop + 1e-12

    def message(self) -> str:
        """One line for the report."""
        return (f"live {self.metric}: canary {self.canary:.4f}, champion {self.champion:.4f} on the same window: "
                f"{'worse' if self.drop > 0 else 'not worse'} by {abs(self.drop):.4f} (max_metric_drop "
                f"{self.max_drop:g}){': breach' if self.breached else ''}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return {"metric": self.metric, "champion": self.champion, "canary": self.canary, "drop": self.drop,
                "max_drop": self.max_drop, "breach": self.breached, "message": self.message()}


@dataclass(frozen=True)
class CanaryJudgement:
    """What a monitor run found about the canary."""

    version: str
    share: float
    """The share of requests routed to it (the deployment file's)."""
    report: MonitorReport | None
    """Its traffic against its own baseline; ``None`` when its bundle has no baseline."""
    versus: VersusChampion | None
    """Its live metric against the champion's; ``None`` unless both have a quality verdict."""
    note: str = ""
    """Why something was not judged (no baseline, no head-to-head)."""
    rows: int = 0
    """Its captured rows in the window (judged or not)."""

    @property
    def breached(self) -> bool:
        """Its traffic drifted or its quality fell, against its baseline or against the champion."""
        return (self.report is not None and self.report.breached) or (self.versus is not None and self.versus.breached)

    def summary(self) -> str:
        """One line for logs and the report."""
        parts = [self.report.summary() if self.report is not None else self.note]
        if self.versus is not None:
            parts.append(self.versus.message())
        return f"canary (version {self.version}): " + "; ".join(p for p in parts if p)

    def to_dict(self) -> dict[str, Any]:
        """The report's ``canary`` entry."""
        return {"version": self.version, "share": self.share, "rows": self.rows, "breached": self.breached,
                "summary": self.summary(),
                "note": self.note, "report": self.report.to_dict() if self.report is not None else None,
                "versus_champion": self.versus.to_dict() if self.versus is not None else None}

    def latest(self) -> dict[str, Any]:
        """``latest.json``'s ``canary`` entry (the gauges' contract, :mod:`kiln.tasks.serving.monitor_gauges`)."""
        report = self.report
        quality = report.quality if report is not None else None
        return {"version": self.version, "rows": self.rows,
                "drifted": report.drifted if report is not None else [],
                "quality": None if quality is None else quality.figures(),
                "versus_champion": None if self.versus is None else
                {"metric": self.versus.metric, "champion": self.versus.champion, "canary": self.versus.canary,
                 "breach": self.versus.breached},
                "breach": self.breached}

    def html(self) -> str:
        """The report page's section on the canary (escaped)."""
        import html

        from kiln.tasks.monitoring.report import report_body

        parts = [f"<h2>Canary: version {html.escape(self.version)} ({self.share:.0%} of requests)</h2>",
                 f"<p class='{'bad' if self.breached else 'good'}'><b>{html.escape(self.summary())}</b></p>"]
        if self.report is not None:
            parts += report_body(self.report, level=3)[1:]  # its summary is in the line above
        return "\n".join(parts)


def judge_canary(version: str, share: float, report: MonitorReport | None, champion: Quality | None,
                 max_drop: float, note: str = "", rows: int | None = None) -> CanaryJudgement:
    """The canary's judgement from its report and the champion's live quality.

    Args:
        version: the canary's registry version.
        share: its share of the requests.
        report: its traffic against its own baseline (``None``: its bundle has none).
        champion: the champion's live quality in the same window (``None``: no labels were joined).
        max_drop: how much worse than the champion the canary's live metric may be.
        note: why the report is missing, when it is.
        rows: its captured rows in the window (default: the report's).
    """
    from kiln.tasks.spec import HIGHER_IS_BETTER

    versus = None
    mine = report.quality if report is not None else None
    if mine is not None and champion is not None and mine.status in _VERDICTS and champion.status in _VERDICTS \
            and mine.metric == champion.metric and mine.metric in HIGHER_IS_BETTER \
            and mine.live is not None and champion.live is not None:
        drop = champion.live - mine.live if HIGHER_IS_BETTER[mine.metric] else mine.live - champion.live
        versus = VersusChampion(mine.metric, champion.live, mine.live, drop, max_drop)
    elif report is not None and not report.no_traffic:
        note = note or ("no head-to-head with the champion: both need a quality verdict (at least "
                        "quality.min_labels labelled rows each) in the window")
    rows = rows if rows is not None else report.rows if report is not None else 0
    return CanaryJudgement(version, share, report, versus, note, rows)
