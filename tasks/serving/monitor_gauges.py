"""The monitor's latest figures, read by the model server for its ``kiln_monitor_*`` gauges.

After each run the pipeline's monitor publishes ``<pipeline>/_monitor/latest/latest.json`` to the artifact store
(format 1, fixed by the monitoring design)::

    {"format": 1, "pipeline": "...", "window": {"start": iso, "end": iso}, "finished_at": iso,
     "versions": ["3"], "rows": 1234, "no_traffic": false,
     "features": {"<feature>": {"psi": 0.31, "p_value": 1e-9, "drift": true}, ...},
     "predictions": {"psi": 0.05, "drift": false},
     "quality": {"metric": "accuracy", "live": 0.9, "baseline": 0.97, "breach": false} | null,
     "breach": true, "action": "retrain" | "alert" | null, "retrain_requested": true,
     "canary": {"version": "4", "rows": 310, "drifted": ["island"],
                "quality": {"metric": "accuracy", "live": 0.8, "baseline": 0.96, "breach": true} | null,
                "versus_champion": {"metric": "accuracy", "champion": 0.95, "canary": 0.8, "breach": true} | null,
                "breach": true} | null}

``canary`` (absent in files from before canaries were judged, read as null) is the canary served when the
monitor ran, judged on its own rows (:mod:`kiln.tasks.monitoring.canary`); the other figures are the champion's.

The server reads only this JSON (none of the monitor's statistics libraries enter its import closure), off the
event loop, when ``/metrics`` is scraped, and reads the file again only when it changed (another published
version: a new path, inode, size or modification time). A missing or damaged file exposes no monitor series and is
logged once (until the problem changes); a store that cannot be reached keeps the figures last read, whose
``kiln_monitor_last_run_timestamp_seconds`` shows their age (the "monitor not run recently" alert).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kiln.tasks.storage.artifacts import ArtifactNotFoundError, ArtifactStore

log = logging.getLogger(__name__)

#: The file the monitor publishes under :func:`latest_key`.
LATEST_FILE = "latest.json"
#: The format of :data:`LATEST_FILE` this reader understands.
LATEST_FORMAT = 1
#: The largest file read (a few hundred features take a few tens of KB).
MAX_LATEST_BYTES = 1 << 20
#: The most features exposed (each is two series).
MAX_FEATURES = 2000


def latest_key(pipeline: str) -> str:
    """The artifact key under which the monitor of ``pipeline`` publishes :data:`LATEST_FILE`."""
    return f"{pipeline}/_monitor/latest"


class LatestFormatError(ValueError):
    """A ``latest.json`` that is not format 1; the message names the field."""


@dataclass(frozen=True)
class FeatureFigures:
    """One feature's drift figures."""

    psi: float | None
    """Population stability index against the training baseline (``None``: not computed, e.g. too few rows)."""
    drift: bool
    """Whether the monitor called the feature drifted."""


@dataclass(frozen=True)
class QualityFigures:
    """The live primary metric against the baseline's test figure."""

    metric: str
    """The metric's name (``accuracy``...)."""
    live: float | None
    """Its value on the labelled live rows (``None``: too few labels)."""
    baseline: float | None
    """Its value on the test split at training time."""


@dataclass(frozen=True)
class CanaryFigures:
    """The figures of the canary judged in the monitor's latest window."""

    version: str
    rows: int
    """Its captured rows in the window."""
    breach: bool
    """Its traffic drifted, or its quality fell against its test figure or the champion's live figure."""
    live: float | None
    """Its primary metric on its labelled live rows (``None``: too few labels)."""
    metric: str | None
    """That metric's name."""


@dataclass(frozen=True)
class MonitorFigures:
    """What the gauges show: the figures of one monitor run."""

    pipeline: str
    """The monitored pipeline."""
    finished_at: float
    """When the run finished, in Unix seconds."""
    rows: int
    """Captured rows in its window."""
    breach: bool
    """Whether the run found a breach (drift or quality)."""
    features: dict[str, FeatureFigures]
    """Per input feature."""
    prediction_psi: float | None
    """PSI of the predictions against the baseline's (``None``: not computed)."""
    quality: QualityFigures | None
    """``None`` where no labels were joined."""
    canary: CanaryFigures | None = None
    """``None`` when no canary was served."""


def _field(obj: dict[str, Any], name: str, kinds: tuple[type, ...], where: str, nullable: bool = False) -> Any:
    value = obj.get(name)
    if value is None and nullable:
        return None
    # bool is an int in Python: a flag where a number belongs is a damaged file too.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(kind.__name__ for kind in kinds) + (" or null" if nullable else "")
        raise LatestFormatError(f"{where}{name}: expected {expected}, found {value!r:.80}")
    return value


def _number(obj: dict[str, Any], name: str, where: str) -> float | None:
    value = _field(obj, name, (int, float), where, nullable=True)
    return None if value is None else float(value)


def _timestamp(text: str, where: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise LatestFormatError(f"{where}: not an ISO 8601 time: {text!r:.80}") from exc
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()  # naive times are UTC


def parse_latest(data: bytes, pipeline: str) -> MonitorFigures:
    """The figures of a ``latest.json`` (format 1, see the module docstring).

    Args:
        data: the file's bytes.
        pipeline: the pipeline whose key the file was read from (the file must name it).

    Returns:
        The figures the gauges expose.

    Raises:
        LatestFormatError: not JSON, another format or pipeline, a missing field or one of the wrong type, too
            many features.
    """
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LatestFormatError(f"not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise LatestFormatError(f"expected a JSON object, found {type(doc).__name__}")
    if doc.get("format") != LATEST_FORMAT:
        raise LatestFormatError(f"format: expected {LATEST_FORMAT}, found {doc.get('format')!r:.40}")
    if _field(doc, "pipeline", (str,), "") != pipeline:
        raise LatestFormatError(f"pipeline: the file names {doc['pipeline']!r:.80}, it was read for {pipeline!r}")
    features = _field(doc, "features", (dict,), "")
    if len(features) > MAX_FEATURES:
        raise LatestFormatError(f"features: {len(features)} features, at most {MAX_FEATURES} are exposed")
    parsed = {}
    for name, figures in features.items():
        where = f"features.{name}."
        if not isinstance(figures, dict):
            raise LatestFormatError(f"{where[:-1]}: expected an object, found {figures!r:.80}")
        parsed[name] = FeatureFigures(_number(figures, "psi", where), _field(figures, "drift", (bool,), where))
    predictions = _field(doc, "predictions", (dict,), "", nullable=True)
    quality = _field(doc, "quality", (dict,), "", nullable=True)
    rows = _field(doc, "rows", (int,), "")
    if rows < 0:
        raise LatestFormatError(f"rows: expected a count, found {rows}")
    canary = _field(doc, "canary", (dict,), "", nullable=True)
    return MonitorFigures(
        canary=None if canary is None else _canary(canary),
        pipeline=pipeline, finished_at=_timestamp(_field(doc, "finished_at", (str,), ""), "finished_at"), rows=rows,
        breach=_field(doc, "breach", (bool,), ""), features=parsed,
        prediction_psi=None if predictions is None else _number(predictions, "psi", "predictions."),
        quality=None if quality is None else QualityFigures(
            _field(quality, "metric", (str,), "quality."), _number(quality, "live", "quality."),
            _number(quality, "baseline", "quality.")))


def _canary(doc: dict[str, Any]) -> CanaryFigures:
    rows = _field(doc, "rows", (int,), "canary.")
    if rows < 0:
        raise LatestFormatError(f"canary.rows: expected a count, found {rows}")
    quality = _field(doc, "quality", (dict,), "canary.", nullable=True)
    return CanaryFigures(
        version=_field(doc, "version", (str,), "canary."), rows=rows, breach=_field(doc, "breach", (bool,), "canary."),
        live=None if quality is None else _number(quality, "live", "canary.quality."),
        metric=None if quality is None else _field(quality, "metric", (str,), "canary.quality."))


class MonitorFiguresReader:
    """The latest monitor figures of the served pipeline, re-read from the store when they change.

    Args:
        store: the artifact store the monitor publishes to (the server's capture store).
    """

    def __init__(self, store: ArtifactStore):
        self.store = store
        self._figures: MonitorFigures | None = None
        self._signature: tuple[Any, ...] | None = None
        self._problem: str | None = None
        self._refreshing = False

    def current(self) -> MonitorFigures | None:
        """The figures to expose now (``None``: none, or the file is missing or damaged)."""
        return self._figures

    async def refresh(self, pipeline: str | None) -> None:
        """Look for a new ``latest.json`` of ``pipeline`` in a worker thread (store reads may be network calls).

        A refresh that is still running when the next scrape comes is not doubled: that scrape shows the figures
        read so far.

        Args:
            pipeline: the served pipeline (``None``: no model is loaded, nothing is exposed).
        """
        if pipeline is None:
            self._figures, self._signature = None, None
            return
        if self._refreshing:
            return
        self._refreshing = True
        try:
            await asyncio.to_thread(self.refresh_now, pipeline)
        finally:
            self._refreshing = False

    def refresh_now(self, pipeline: str) -> None:
        """:meth:`refresh` in the calling thread."""
        key = latest_key(pipeline)
        try:
            path = self.store.path(key) / LATEST_FILE
            stat = path.stat()
        except (ArtifactNotFoundError, FileNotFoundError):
            self._expose(None, None, f"no monitor figures at {self.store.uri(key)}/{LATEST_FILE} yet (the monitor "
                                     "has not run): no kiln_monitor_* series", logging.INFO)
            return
        except Exception as exc:  # noqa: BLE001 - an unreachable store keeps the last figures; their age shows
            self._report(f"cannot read the monitor figures at {self.store.uri(key)}: {exc}; the figures read "
                         "before stay exposed", logging.WARNING)
            return
        signature = (pipeline, str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if signature == self._signature:
            return
        try:
            if stat.st_size > MAX_LATEST_BYTES:
                raise LatestFormatError(f"{stat.st_size} bytes, at most {MAX_LATEST_BYTES} are read")
            figures = parse_latest(path.read_bytes(), pipeline)
        except (LatestFormatError, OSError) as exc:
            self._expose(None, signature, f"damaged monitor figures at {self.store.uri(key)}/{LATEST_FILE}: "
                                          f"{exc}; no kiln_monitor_* series", logging.WARNING)
            return
        self._expose(figures, signature, None, logging.INFO)
        log.info("monitor figures of %s from the run finished at %s: %d rows, breach %s", pipeline,
                 datetime.fromtimestamp(figures.finished_at, UTC).isoformat(), figures.rows, figures.breach)

    def _expose(self, figures: MonitorFigures | None, signature: tuple[Any, ...] | None, problem: str | None,
                level: int) -> None:
        self._figures, self._signature = figures, signature
        self._report(problem, level)

    def _report(self, problem: str | None, level: int) -> None:
        """Log a problem once: scrapes come every few seconds, and the same missing file is no news."""
        if problem is not None and problem != self._problem:
            log.log(level, "%s", problem)
        self._problem = problem

