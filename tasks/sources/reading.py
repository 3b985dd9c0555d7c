"""Take a snapshot of a source: list (or query), select, read and stream into ``snapshot.parquet``; say what was
read in the manifest's words. ``ingest`` calls :func:`snapshot_files` or :func:`snapshot_sql`."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.tasks.sources.errors import IngestError
from kiln.tasks.sources.files import TypeGuessError
from kiln.tasks.sources.incremental import Previous, check_events, select_parts
from kiln.tasks.sources.listing import list_source
from kiln.tasks.sources.parts import open_parts
from kiln.tasks.sources.snapshot import SnapshotStats, write_snapshot

if TYPE_CHECKING:
    from kiln.tasks.spec import SourceSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """``sample_fraction`` and its seed."""

    fraction: float
    seed: int


@dataclass(frozen=True)
class Taken:
    """A written snapshot and what the manifest says of its source."""

    stats: SnapshotStats
    source_sha256: str
    """One part: the sha256 of its bytes; several: the listing's fingerprint; SQL: the sha256 of the query, its
    parameters and the connection id."""
    record: dict[str, Any]
    """The manifest's fields about the source (``parts``, ``incremental``, ``trigger`` or ``sql``)."""


def snapshot_files(source: SourceSpec, roots: tuple[Path, ...], snapshot: Path, scratch: Path, sampling: Sampling,
                   previous: Previous | None, events: Sequence[Mapping[str, Any]], row_group_rows: int | None = None
                   ) -> Taken:
    """Snapshot a file, folder, ``pkg://`` or ``s3://`` source (in row groups of at most ``row_group_rows``; None:
    the snapshot's default).

    Raises:
        IngestError: see :func:`~kiln.tasks.sources.listing.list_source`, :func:`select_parts`,
            :func:`check_events`, :func:`~kiln.tasks.sources.parts.open_parts` and :func:`write_snapshot`.
    """
    listing = list_source(source, roots)
    announced = check_events(listing, events)
    selection = select_parts(listing, source.incremental, previous)
    reader = open_parts(listing, selection.parts, source, scratch)
    label = str(source.uri)
    append = selection.append_to.snapshot if selection.append_to is not None else None
    try:
        stats = write_snapshot(snapshot, reader.schema, reader.batches(), label=label, fraction=sampling.fraction,
                               seed=sampling.seed, previous=append, scratch=scratch, row_group_rows=row_group_rows)
    except TypeGuessError as exc:
        log.info("a value does not fit the types of the first block (%s); settling the types from every value", exc)
        reader = reader.exact()
        stats = write_snapshot(snapshot, reader.schema, reader.batches(), label=label, fraction=sampling.fraction,
                               seed=sampling.seed, previous=append, scratch=scratch, row_group_rows=row_group_rows)
    log.info("read %d part(s) of %s: %d rows; snapshot %d rows", len(reader.records), label, stats.rows_read,
             stats.rows)
    records = list(reader.records)
    digest = records[0]["sha256"] if len(listing.parts) == 1 else listing.fingerprint()
    record: dict[str, Any] = {"parts": records, "ingested_parts": list(selection.ingested),
                              "listing_fingerprint": listing.fingerprint(),
                              "incremental": {"mode": source.incremental, "previous_run": selection.previous_run,
                                              "previous_rows": stats.previous_rows, "new_rows": stats.rows_read}}
    if announced:
        record["trigger"] = {"parts": announced}
    return Taken(stats, digest, record)


def snapshot_sql(source: SourceSpec, connection_url: Callable[[str], str] | None, snapshot: Path, scratch: Path,
                 sampling: Sampling, interval: tuple[datetime, datetime] | None, now: datetime,
                 row_group_rows: int | None = None) -> Taken:
    """Snapshot the result of ``source.sql.query`` (in row groups of at most ``row_group_rows``; None: the
    snapshot's default).

    Raises:
        IngestError: no connection resolver or no such connection (naming ``source.sql.conn_id``), a failing
            query, more than ``max_rows`` rows, or an empty result.
        SourceUnreachableError: the database cannot be reached.
    """
    from kiln.tasks.sources.sql import QueryRead, bind_parameters, read_query

    sql = source.sql
    assert sql is not None
    if connection_url is None:
        raise IngestError(f"source.sql.conn_id '{sql.conn_id}': this run has no Airflow connections to resolve it "
                          "(run the pipeline from its DAG, or give RunContext.connection_url)")
    try:
        url = connection_url(sql.conn_id)
    except LookupError as exc:
        raise IngestError(f"source.sql.conn_id: {exc}") from None
    read = QueryRead(conn_id=sql.conn_id, query=sql.query, parameters=bind_parameters(sql.query, interval, now),
                     max_rows=sql.max_rows)
    batches = read_query(read, url)
    first = next(batches, None)
    if first is None or read.schema is None:
        said = ", ".join(f"{k}={v.isoformat()}" for k, v in read.parameters.items()) or "no parameters"
        raise IngestError(f"source.sql.query on connection '{sql.conn_id}' returned no rows ({said}); nothing to "
                          "ingest: check the query and the run's data interval, or wait for data in that interval")

    def rows() -> Any:
        yield first
        yield from batches

    try:
        stats = write_snapshot(snapshot, read.schema, rows(), label=f"source.sql.query on '{sql.conn_id}'",
                               fraction=sampling.fraction, seed=sampling.seed, previous=None, scratch=scratch,
                               row_group_rows=row_group_rows)
    finally:
        batches.close()  # a failed write closes the cursor and the connection now
    record = read.manifest()
    log.info("query on connection %s: %d rows with %s", sql.conn_id, read.rows, record["parameters"])
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    return Taken(stats, digest, {"sql": record})
