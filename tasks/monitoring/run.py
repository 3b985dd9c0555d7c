"""One monitor run: judge the served champion's captured traffic of a window against its training baseline.

:func:`run_monitor` reads what the pipeline's endpoint serves (its deployment file), the champion bundle's
baseline (:func:`kiln.tasks.bundle.baseline.load_baseline`), the window's captured rows and labels
(:mod:`.window`), computes drift and quality (:mod:`.drift`, :mod:`.quality`) into the report (:mod:`.report`),
checks the live inputs with the spec's declared expectations, and publishes to the artifact store:

    <pipeline>/_monitor/<window end yyyymmddThhmmss>/   report.json, report.html (+ validation/ Data Docs,
                                                     + labelled.parquet with retrain.append_labelled: .labelled)
    <pipeline>/_monitor/latest/latest.json           the figures the model server's gauges show (format 1)

then logs the report folder to the served versions' MLflow runs under ``monitoring/<window end>/``. A window
without traffic, or a champion whose bundle predates baselines, is reported as such and is never a breach. A breach
is an outcome, not an error: the caller (the monitor DAG) acts on :attr:`MonitorOutcome.retrain_requested`.

The window is ``[end - window_hours, end)`` with ``end`` the run's time (Airflow's ``run_after``, the same for
every try of a run, so a retried run rewrites its own report folder). The folder is named by that time to the
second: two runs never share one, so a later run cannot replace the ``labelled.parquet`` that a queued retrain
run is about to read.

The champion's traffic and a canary's are judged apart, each against its own bundle's baseline: the canary's rows,
answered by another model, would blur the champion's prediction and quality figures. The canary's judgement
(:mod:`.canary`: its drift and quality, and its live metric against the champion's on the same window) is in the
report and ``latest.json`` and is alerted on; only the champion's breach acts (``on_breach``), since the canary is
the candidate the rollout's ``verify`` step decides on.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.tasks.monitoring.canary import CanaryJudgement, judge_canary
from kiln.tasks.monitoring.labelled import LabelledExport, input_columns
from kiln.tasks.monitoring.report import REPORT_HTML, REPORT_JSON, MonitorReport, build_report, render_html
from kiln.tasks.monitoring.window import WindowRead, read_captures, read_feedback
from kiln.tasks.serving.monitor_gauges import LATEST_FILE, LATEST_FORMAT, latest_key
from kiln.tasks.storage.artifacts import ArtifactStore, atomic_write_bytes, write_json

if TYPE_CHECKING:
    from kiln.tasks.bundle.baseline import Baseline
    from kiln.tasks.monitoring.drift import DriftThresholds
    from kiln.tasks.serving.deployment import Deployment
    from kiln.tasks.spec import ExpectationSpec, MonitoringSpec, PipelineSpec

log = logging.getLogger(__name__)

VALIDATION_DOCS = "validation"
STAMP_FORMAT = "%Y%m%dT%H%M%S"


def monitor_key(pipeline: str, end: datetime) -> str:
    """The artifact key of the report of the window ending at ``end``."""
    return f"{pipeline}/_monitor/{end.astimezone(UTC):{STAMP_FORMAT}}"


@dataclass(frozen=True)
class MonitorConfig:
    """What one pipeline's monitor judges, and by which thresholds (derived from the spec)."""

    pipeline: str
    monitoring: MonitoringSpec
    """The spec's ``monitoring`` section."""
    quality_metric: str
    """The metric compared live (``monitoring.quality.metric`` or the primary metric)."""
    deployment_file: Path
    """The endpoint's deployment file: what is served."""
    expectations: tuple[ExpectationSpec, ...] = ()
    """Checked on the live inputs when ``monitoring.validate_live`` (see :func:`live_expectations`)."""
    log_to_mlflow: bool = True
    """Log the report folder to the champion's MLflow run (the registry version's run)."""
    target: str = ""
    """The spec's target column: the labelled rows exported for a retrain (``monitoring.retrain.append_labelled``)
    carry the label under this name."""

    def __post_init__(self) -> None:
        if self.monitoring.retrain.append_labelled and not self.target:
            raise ValueError("MonitorConfig.target: monitoring.retrain.append_labelled needs the target column's "
                             "name (MonitorConfig.from_spec gives the spec's)")

    @classmethod
    def from_spec(cls, spec: PipelineSpec, deployment_file: Path) -> MonitorConfig:
        """The config of ``spec``'s monitor.

        Args:
            spec: the pipeline.
            deployment_file: its endpoint's deployment file (``kiln.tasks.pipeline.endpoint.Endpoint.of(spec)``;
                the run wiring knows where endpoints live, this library does not).

        Raises:
            ValueError: the spec has no ``monitoring`` section.
        """
        if spec.monitoring is None:
            raise ValueError(f"pipeline {spec.name} has no monitoring section")
        return cls(spec.name, spec.monitoring, spec.quality_metric, deployment_file, live_expectations(spec),
                   target=spec.target)


def live_expectations(spec: PipelineSpec) -> tuple[ExpectationSpec, ...]:
    """The declared expectations that apply to live inputs: not those naming the target (traffic has none), nor
    the table's row count or columns (a window's row count is its traffic, and its columns are the capture's)."""
    from kiln.tasks.features.expectation_suite import ROW_COUNT_TYPES, SCHEMA_TYPES

    def names_target(e: ExpectationSpec) -> bool:
        named = [e.kwargs.get(k) for k in ("column", "column_A", "column_B")] + list(e.kwargs.get("column_list") or [])
        return spec.target in named or spec.target in str(e.kwargs.get("row_condition") or "")

    return tuple(e for e in spec.expectations.declared
                 if not names_target(e) and e.type not in ROW_COUNT_TYPES | SCHEMA_TYPES)


@dataclass(frozen=True)
class MonitorOutcome:
    """What one monitor run found and published."""

    pipeline: str
    report_key: str
    """Where the report folder was published."""
    summary: str
    breach: bool
    action: str | None
    """``alert`` or ``retrain`` on a breach (the spec's ``on_breach``), else None."""
    retrain_requested: bool
    """A breach with ``on_breach: retrain`` outside the cool-down: the DAG emits the retrain Asset event."""
    latest: dict[str, Any] = field(default_factory=dict)
    """The content of ``latest.json``."""
    notes: list[str] = field(default_factory=list)
    labelled_key: str | None = None
    """The report folder holding the labelled rows exported for a retrain (``labelled.parquet``), or None."""
    labelled_rows: int = 0
    """Rows in that file."""
    canary: dict[str, Any] | None = None
    """``{"version", "breach", "summary"}`` of the canary judged in the window, or None when none is served."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the monitor task's XCom)."""
        return asdict(self)


def run_monitor(config: MonitorConfig, store: ArtifactStore, now: datetime) -> MonitorOutcome:
    """Judge the window ending at ``now`` and publish the report and the latest figures.

    Args:
        config: what to judge and how.
        store: the artifact store the model server captures to.
        now: the run's time (timezone-aware); the window ends at it.

    Returns:
        The outcome; a breach is an outcome, not an exception.

    Raises:
        ValueError: a naive ``now``.
        DeploymentError: the deployment file exists but cannot be read.
        BaselineError: the champion's baseline is damaged (altered files).
        ArtifactStoreError: the store failed (a single unreadable batch is skipped and reported instead).
    """
    from kiln.tasks.bundle.baseline import load_baseline
    from kiln.tasks.serving.deployment import read_deployment

    if now.tzinfo is None:
        raise ValueError(f"now {now.isoformat()} has no timezone: pass an aware datetime (UTC)")
    end = now.astimezone(UTC)
    start = end - timedelta(hours=config.monitoring.window_hours)
    deployment = read_deployment(config.deployment_file) if config.deployment_file.is_file() else None
    notes: list[str] = []
    baseline = None
    if deployment is None:
        notes.append(f"nothing is served (no deployment file {config.deployment_file}): no traffic to judge")
    else:
        baseline = load_baseline(deployment.champion.bundle)
        if baseline is None:
            notes.append(f"the champion (version {deployment.champion.version}) was exported before bundles "
                         "carried a training baseline: no drift or quality is claimed; retrain to get one")
    versions = [deployment.champion.version] if deployment is not None else []
    captures = read_captures(store, config.pipeline, versions, start, end)
    feedback = read_feedback(store, config.pipeline, start, end)
    report = _report(config, versions, captures, feedback, baseline)
    canary = _judge_canary(config, store, deployment, start, end, feedback, report) if deployment else None
    key = monitor_key(config.pipeline, end)
    validation = labelled = None
    with store.writer(key) as folder:
        if config.monitoring.validate_live and config.expectations and captures.rows:
            validation = validate_live(captures, baseline, list(config.expectations), folder / VALIDATION_DOCS)
        if config.monitoring.retrain.append_labelled:
            labelled = _export_labelled(config, store, folder, captures, feedback, baseline, notes)
        write_monitor_report(report, folder, notes, validation, labelled, canary)
    if config.log_to_mlflow and deployment is not None:
        _log_to_mlflow(config.pipeline, deployment, store.path(key), end)
    outcome = _publish_latest(config, store, report, key, end, notes, canary)
    if labelled is not None and labelled.rows:
        outcome = replace(outcome, labelled_key=key, labelled_rows=labelled.rows)
    return outcome


def _judge_canary(config: MonitorConfig, store: ArtifactStore, deployment: Deployment, start: datetime,
                  end: datetime, feedback: WindowRead, champion: MonitorReport) -> CanaryJudgement | None:
    """The canary's rows of the window against its own baseline, and its live metric against the champion's."""
    from kiln.tasks.bundle.baseline import load_baseline

    if deployment.canary is None:
        return None
    version = deployment.canary.version
    baseline = load_baseline(deployment.canary.bundle)
    captures = read_captures(store, config.pipeline, [version], start, end)
    report = _report(config, [version], captures, feedback, baseline) if baseline is not None else None
    note = "" if baseline is not None else (f"its bundle was exported before bundles carried a training baseline: "
                                            f"{captures.rows} captured rows, no drift or quality is claimed")
    judgement = judge_canary(version, deployment.canary.share, report, champion.quality,
                             config.monitoring.quality.max_metric_drop, note, captures.rows)
    log.log(logging.WARNING if judgement.breached else logging.INFO, "%s", judgement.summary())
    return judgement


def _export_labelled(config: MonitorConfig, store: ArtifactStore, folder: Path, captures: WindowRead,
                     feedback: WindowRead, baseline: Baseline | None, notes: list[str]) -> LabelledExport:
    """The labelled rows received since the last retrain request, into ``folder`` (a note says how many)."""
    from kiln.tasks.monitoring.labelled import LABELLED_FILE, export_labelled
    from kiln.tasks.monitoring.retrain import load_state

    last = load_state(store, config.pipeline)
    export = export_labelled(folder, captures.frame, feedback.frame, baseline, config.target,
                             last.at if last is not None else None)
    since = f" received since the last retrain request ({export.since})" if export.since else ""
    notes.append(f"{export.rows} labelled captured rows{since} exported to {LABELLED_FILE} for a retrain"
                 + (f" ({export.left_out} older ones left out: at most the newest are kept)" if export.left_out
                    else ""))
    return export


def _report(config: MonitorConfig, versions: list[str], captures: WindowRead, feedback: WindowRead,
            baseline: Baseline | None) -> MonitorReport:
    """The window's report: C's drift figures, and the quality on ``quality.min_labels`` labelled rows."""
    from kiln.tasks.monitoring.quality import live_quality
    from kiln.tasks.monitoring.window import join_labels

    thresholds: DriftThresholds = config.monitoring.thresholds()
    if baseline is None:  # no figures to compare with: the report holds the traffic and the skipped batches only
        return MonitorReport(config.pipeline, versions, captures.start, captures.end, captures.rows, thresholds,
                             files_read=len(captures.files) + len(feedback.files),
                             skipped=[*captures.skipped, *feedback.skipped])
    report = build_report(config.pipeline, versions, captures, baseline, thresholds)
    report.files_read += len(feedback.files)
    report.skipped += feedback.skipped
    if captures.rows:
        metric, figures = config.quality_metric, dict(baseline.metrics.get("all") or {})
        if metric == baseline.metrics.get("primary"):
            figures.setdefault(metric, baseline.metrics.get("value"))
        metrics = {"primary": metric, "value": figures.get(metric), "all": figures}
        report.quality = live_quality(join_labels(captures.frame, feedback.frame), baseline.predictions, metrics,
                                      replace(thresholds, min_rows=config.monitoring.quality.min_labels))
    return report


def validate_live(captures: WindowRead, baseline: Baseline | None, specs: list[ExpectationSpec],
                  docs_dir: Path) -> dict[str, Any]:
    """Check the window's input columns with ``specs`` (Great Expectations, as ``validate`` does).

    Args:
        captures: the window's captured rows.
        baseline: the champion's baseline (its profile names the input columns), if any.
        specs: the expectations (:func:`live_expectations`).
        docs_dir: where the Data Docs page is written.

    Returns:
        ``{"success", "statistics", "expectations": [...]}`` (each as the validate step reports it).
    """
    from kiln.tasks.features.expectation_report import expectation_report, jsonable
    from kiln.tasks.features.expectation_suite import check_expectations, run_suite

    check_expectations(specs, where="monitoring live expectations")
    frame = captures.frame[input_columns(list(captures.frame.columns), baseline)]
    with tempfile.TemporaryDirectory(prefix="kiln-monitor-") as tmp:
        snapshot = Path(tmp) / "live.parquet"
        frame.to_parquet(snapshot, index=False)
        result = run_suite(snapshot, specs, docs_dir)
    out = {"success": bool(result.success), "statistics": jsonable(dict(result.statistics)),
           "expectations": [expectation_report(r) for r in result.results]}
    if not out["success"]:
        failed = [f"{e['type']}({e['kwargs'].get('column', '')})" for e in out["expectations"] if not e["success"]]
        log.warning("live inputs of the window fail %d expectation(s): %s", len(failed), ", ".join(failed))
    return out


def write_monitor_report(report: MonitorReport, folder: Path, notes: list[str], validation: dict[str, Any] | None,
                         labelled: LabelledExport | None = None, canary: CanaryJudgement | None = None) -> None:
    """``report.json`` (C's report plus ``notes``, ``validation``, ``labelled``: the rows exported for a retrain,
    None when ``append_labelled`` is off, and ``canary``: its judgement, None when none is served) and
    ``report.html`` (C's page plus a section for each), each written atomically into ``folder``."""
    import html

    write_json(folder / REPORT_JSON, {**report.to_dict(), "notes": notes, "validation": validation,
                                      "labelled": labelled.to_dict() if labelled is not None else None,
                                      "canary": canary.to_dict() if canary is not None else None})
    extra = "".join(f"<p><b>Note:</b> {html.escape(n)}</p>" for n in notes)
    if canary is not None:
        extra += canary.html()
    if validation is not None:
        failed = [e for e in validation["expectations"] if not e["success"]]
        rows = "".join(f"<tr><td>{html.escape(e['type'])}</td><td>{html.escape(str(e['kwargs']))}</td>"
                       f"<td>{e['unexpected_count']}</td></tr>" for e in failed)
        extra += (f"<h2>Live input expectations</h2><p>{len(validation['expectations']) - len(failed)} of "
                  f"{len(validation['expectations'])} passed; Data Docs in <code>{VALIDATION_DOCS}/</code>.</p>"
                  + (f"<table><tr><th>expectation</th><th>kwargs</th><th>unexpected</th></tr>{rows}</table>"
                     if failed else ""))
    atomic_write_bytes(folder / REPORT_HTML, render_html(report, [extra]).encode())


def latest_figures(report: MonitorReport, finished_at: datetime, action: str | None, retrain_requested: bool,
                   canary: CanaryJudgement | None = None) -> dict[str, Any]:
    """The content of ``latest.json`` (format 1, the contract with the model server's gauges)."""
    prediction = report.prediction
    quality = report.quality
    return {
        "format": LATEST_FORMAT, "pipeline": report.pipeline,
        "window": {"start": report.start.isoformat(), "end": report.end.isoformat()},
        "finished_at": finished_at.isoformat(), "versions": list(report.versions), "rows": report.rows,
        "no_traffic": report.no_traffic,
        "features": {f.column: {"psi": f.to_dict()["psi"], "p_value": f.to_dict()["p_value"], "drift": f.drifted}
                     for f in report.features},
        "predictions": None if prediction is None or prediction.psi is None else
        {"psi": prediction.to_dict()["psi"], "drift": prediction.drifted},
        "quality": None if quality is None else quality.figures(),
        "breach": report.breached, "action": action, "retrain_requested": retrain_requested,
        "canary": canary.latest() if canary is not None else None}


def _publish_latest(config: MonitorConfig, store: ArtifactStore, report: MonitorReport, key: str, end: datetime,
                    notes: list[str], canary: CanaryJudgement | None) -> MonitorOutcome:
    from kiln.tasks.monitoring.retrain import should_request

    breach = report.breached
    action = config.monitoring.on_breach if breach else None
    requested = action == "retrain" and should_request(store, config.pipeline, end,
                                                       config.monitoring.retrain.cooldown_hours)
    latest = latest_figures(report, datetime.now(UTC), action, requested, canary)
    with store.writer(latest_key(config.pipeline)) as out:
        write_json(out / LATEST_FILE, latest)
    summary = report.summary()
    if breach:
        log.warning("monitor breach (%s%s): %s; report %s", action,
                    ", retrain requested" if requested else "", summary, store.uri(key))
    else:
        log.info("monitor: %s; report %s", summary, store.uri(key))
    return MonitorOutcome(config.pipeline, key, summary, breach, action, requested, latest, notes,
                          canary=None if canary is None else
                          {"version": canary.version, "breach": canary.breached, "summary": canary.summary()})


def _log_to_mlflow(pipeline: str, deployment: Deployment, folder: Path, end: datetime) -> None:
    """Log the report folder to the served versions' MLflow runs (the champion's, and the canary's when one is
    served) under ``monitoring/<window end>/``."""
    from kiln.tasks.tracking.registry import Registry

    registry = Registry.from_settings()
    served = [deployment.champion.version] + ([deployment.canary.version] if deployment.canary is not None else [])
    for version in served:
        run_id = registry.version(pipeline, version).run_id
        if not run_id:
            log.warning("version %s of %s has no MLflow run: the report is only in the store", version, pipeline)
            continue
        registry.client.log_artifacts(run_id, str(folder), f"monitoring/{end:{STAMP_FORMAT}}")
        log.info("logged the monitor report to MLflow run %s (version %s) under monitoring/%s", run_id, version,
                 f"{end:{STAMP_FORMAT}}")
