"""The ``ingest`` step: read the source named by the spec and freeze it as a Parquet snapshot plus a manifest.

Every later step reads the snapshot, never the source, so a run is reproducible even if the source changes: the
manifest records exactly what was read (each file or object with its ETag, size and sha256, or the query, its
bound parameters and row count) and the sha256 of the snapshot. A run takes its snapshot once: a retried
``ingest`` of the same run returns the snapshot already taken. The readers live in :mod:`kiln.tasks.sources`;
they stream, so the source may be larger than memory.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.accepted import read_accepted
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.sources.errors import IngestError
from kiln.tasks.sources.incremental import Previous
from kiln.tasks.spec import PipelineSpec, SourceSpec
from kiln.tasks.spec.sources import data_roots
from kiln.tasks.storage.artifacts import ArtifactStore, file_sha256, read_json, write_json

log = logging.getLogger(__name__)

__all__ = ["IngestConfig", "IngestError", "IngestResult", "IngestRun", "ingest", "run_ingest"]


@dataclass(frozen=True)
class IngestConfig:
    """Settings of the ``ingest`` step."""

    source: SourceSpec
    """Where the raw data comes from and how to parse it."""
    sample_fraction: float = 1.0
    """Fraction of rows kept, in ``(0, 1]``; the sample is seeded and keeps the source's row order."""
    seed: int = 42
    """Random seed of the sample."""
    data_roots: tuple[Path, ...] | None = None
    """The folders a file source may be read from; ``None``: the configured ones (``$KILN_HOME/data`` and
    ``KILN_DATA_ROOTS``) only. ``pkg://`` sources need no root."""
    pipeline: str = ""
    """The pipeline's name (a SQL source's ``source_uri`` is ``sql://<conn_id>/<pipeline>``)."""
    row_group_rows: int | None = None
    """The most rows per row group of the snapshot; None: the snapshot's default (1,000,000). A scoring run
    stages its input in row groups of its partition size, so that a partition decodes only its own rows."""

    def __post_init__(self) -> None:
        if not 0 < self.sample_fraction <= 1:
            raise ValueError(f"IngestConfig.sample_fraction must be in (0, 1], got {self.sample_fraction}")
        if self.row_group_rows is not None and self.row_group_rows < 1:
            raise ValueError(f"IngestConfig.row_group_rows must be at least 1 (or None), got {self.row_group_rows}")

    @classmethod
    def from_spec(cls, spec: PipelineSpec, spec_dir: str | Path | None = None) -> IngestConfig:
        """The config a pipeline spec implies (the sample is seeded by ``training.seed``); file sources may be
        read from ``spec_dir`` (the spec file's folder) and the configured data roots."""
        return cls(source=spec.source, sample_fraction=spec.sample_fraction, seed=spec.training.seed,
                   data_roots=data_roots(spec_dir), pipeline=spec.name)


@dataclass(frozen=True)
class IngestRun:
    """What the run adds to the config: the previous snapshot, the events that started it, its data interval, its
    connections and its artifact store."""

    previous: Previous | None = None
    """The last accepted snapshot (``source.incremental``), or ``None``."""
    trigger_events: tuple[Mapping[str, Any], ...] = ()
    """The extras of the Asset events that started the run; a retrain event's ``kiln_retrain.labelled`` names
    labelled rows to append (:mod:`kiln.tasks.sources.appended`)."""
    data_interval: tuple[datetime, datetime] | None = None
    connection_url: Callable[[str], str] | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    store: ArtifactStore | None = None
    """Where the labelled rows that a retrain event names are read from (needed only then)."""


@dataclass(frozen=True)
class IngestResult:
    """What ``ingest`` wrote: the snapshot's shape and fingerprints."""

    rows: int
    columns: dict[str, str]
    """Column name to pandas dtype name, in column order."""
    sha256: str
    """sha256 of ``snapshot.parquet``."""
    source_uri: str
    source_sha256: str
    """sha256 of the raw source file's bytes (several parts: the listing's fingerprint; SQL: of the query, its
    parameters and the connection id)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the step's XCom value)."""
        return asdict(self)


def run_ingest(config: IngestConfig, out_dir: Path, run: IngestRun | None = None) -> IngestResult:
    """Read the source and write ``snapshot.parquet`` and ``manifest.json`` into ``out_dir``.

    Args:
        config: the source and sampling settings.
        out_dir: an empty folder that the caller publishes once this returns.
        run: the run's previous snapshot, trigger events, data interval and connections (default: none).

    Returns:
        The snapshot's row count, column dtypes and sha256 digests.

    Raises:
        IngestError: the source is missing, unreadable, not in the declared format, empty (also after sampling),
            has duplicate column names or partitions that differ, has nothing new (incremental), changed since
            the event that started the run; the connection is missing or the query fails or returns nothing;
            labelled rows a retrain event names are missing, too many, or do not cast to the snapshot's types
            (nothing is left in ``out_dir`` then).
        SourceUnreachableError: the S3 endpoint or the database cannot be reached (a retry may succeed).
    """
    # The readers import pyarrow and pandas: imported here, so the DAG file that lists the steps parses quickly.
    from kiln.tasks.sources.appended import append_labelled, labelled_keys, open_labelled
    from kiln.tasks.sources.reading import Sampling, snapshot_files, snapshot_sql
    from kiln.tasks.sources.snapshot import pandas_dtypes

    run = run or IngestRun()
    source, out_dir = config.source, Path(out_dir)
    snapshot, scratch = out_dir / keys.SNAPSHOT_FILE, out_dir / ".ingest-scratch"
    sampling = Sampling(config.sample_fraction, config.seed)
    labelled = open_labelled(labelled_keys(run.trigger_events), run.store)
    scratch.mkdir()
    try:
        if source.sql is not None:
            taken = snapshot_sql(source, run.connection_url, snapshot, scratch, sampling, run.data_interval,
                                 run.started_at, config.row_group_rows)
        else:
            roots = data_roots(None) if config.data_roots is None else config.data_roots
            taken = snapshot_files(source, roots, snapshot, scratch, sampling, run.previous, run.trigger_events,
                                   config.row_group_rows)
        rows, schema = taken.stats.rows, taken.stats.schema
        if labelled:
            try:
                rows, schema = append_labelled(snapshot, labelled, scratch, source.asset_uri(config.pipeline),
                                               config.row_group_rows)
            except BaseException:
                snapshot.unlink(missing_ok=True)
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    columns = pandas_dtypes(schema)
    result = IngestResult(rows=rows, columns=columns, sha256=file_sha256(snapshot),
                          source_uri=source.asset_uri(config.pipeline), source_sha256=taken.source_sha256)
    write_json(out_dir / keys.SNAPSHOT_MANIFEST_FILE, {
        "source_uri": result.source_uri,
        "source_kind": source.kind,
        "source_sha256": result.source_sha256,
        **taken.record,
        **({"appended": [f.to_dict() for f in labelled]} if labelled else {}),
        "rows": result.rows,
        "columns": columns,
        "sha256": result.sha256,
        "sample_fraction": config.sample_fraction,
        "seed": config.seed,
        "created_at": datetime.now(UTC).isoformat(),
    })
    log.info("wrote %s: %d rows, %d columns, sha256 %s", snapshot, result.rows, len(columns), result.sha256[:12])
    return result


def ingest(ctx: RunContext) -> IngestResult:
    """Snapshot the source into ``<run>/ingest``, once per run.

    The snapshot is immutable: a retried or re-run ``ingest`` of the same run returns the snapshot already taken
    instead of re-reading a source that may have changed since, so every later step of the run sees the same rows.
    """
    key = ctx.key(keys.INGEST)
    if ctx.store.exists(key):
        manifest = read_json(ctx.input_dir(keys.INGEST) / keys.SNAPSHOT_MANIFEST_FILE)
        log.info("snapshot for %s already taken (%d rows, sha256 %s); reusing it", ctx.run_key, manifest["rows"],
                 manifest["sha256"][:12])
        return IngestResult(**{k: v for k, v in manifest.items() if k in IngestResult.__dataclass_fields__})
    config = IngestConfig.from_spec(ctx.spec, Path(ctx.spec_path).parent if ctx.spec_path else None)
    run = IngestRun(previous=_previous(ctx), trigger_events=tuple(ctx.trigger_events),
                    data_interval=ctx.data_interval, connection_url=ctx.connection_url, store=ctx.store)
    result = ctx.publish(keys.INGEST, lambda out: run_ingest(config, out, run))
    (ctx.input_dir(keys.INGEST) / keys.SNAPSHOT_FILE).chmod(0o444)
    return result


def _previous(ctx: RunContext) -> Previous | None:
    """The last accepted snapshot, when ``source.incremental`` needs it."""
    if ctx.spec.source.incremental == "off":
        return None
    accepted = read_accepted(ctx.store, ctx.spec.name)
    if accepted is None:
        return None
    snapshot = ctx.store.path(f"{accepted.run_key}/{keys.INGEST}") / keys.SNAPSHOT_FILE
    return Previous(run_key=accepted.run_key, manifest=accepted.manifest, snapshot=snapshot)
