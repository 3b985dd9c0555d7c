"""The snapshot file: record batches streamed into one Parquet file in row groups of at most 1,000,000 rows
(:data:`ROW_GROUP_ROWS`; a writer may be given fewer: a scoring run stages its input in row groups of its partition
size, so that each partition decodes only its own rows).

Memory stays at one row group's buffer (at most that many rows or :data:`ROW_GROUP_BYTES` bytes) whatever the
source's size. ``sample_fraction`` keeps the rows pandas' ``DataFrame.sample(frac, random_state=seed)``
keeps (the same seeded draw, in source order), drawn over the rows read by this run once their count is known: the
rows go to a scratch file first, then through the draw into the snapshot.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kiln.tasks.features.batches import dictionary_columns
from kiln.tasks.sources.errors import IngestError
from kiln.tasks.sources.files import conform, unify

log = logging.getLogger(__name__)

ROW_GROUP_ROWS = 1_000_000
ROW_GROUP_BYTES = 128 << 20
READ_BATCH_ROWS = 65_536


class SnapshotWriter:
    """Write batches of one schema into a Parquet file, buffering up to one row group.

    Args:
        path: the file to write.
        schema: the file's schema (batches are conformed to it).
        label: the source, for messages.
        row_group_rows: the most rows per row group; None: :data:`ROW_GROUP_ROWS`.
    """

    def __init__(self, path: Path, schema: pa.Schema, label: str, row_group_rows: int | None = None):
        self.path, self.schema, self.label = path, schema.remove_metadata(), label
        self.row_group_rows = ROW_GROUP_ROWS if row_group_rows is None else row_group_rows
        if self.row_group_rows < 1:
            raise ValueError(f"row_group_rows must be at least 1, found {self.row_group_rows}")
        self.rows = 0
        self._buffer: list[pa.RecordBatch] = []
        self._buffered_rows = self._buffered_bytes = 0
        self._writer = pq.ParquetWriter(path, self.schema, compression="snappy",
                                        use_dictionary=dictionary_columns(self.schema))

    def write(self, batch: pa.RecordBatch) -> None:
        """Add ``batch`` (conformed to the schema); a full row group goes to the file."""
        if batch.num_rows == 0:
            return
        batch = conform(batch, self.schema, self.label)
        self._buffer.append(batch)
        self._buffered_rows += batch.num_rows
        self._buffered_bytes += batch.nbytes
        self.rows += batch.num_rows
        while self._buffered_rows >= self.row_group_rows or self._buffered_bytes >= ROW_GROUP_BYTES:
            self._flush(min(self._buffered_rows, self.row_group_rows))

    def _flush(self, rows: int) -> None:
        table = pa.Table.from_batches(self._buffer, schema=self.schema)
        self._writer.write_table(table.slice(0, rows), row_group_size=rows)
        rest = table.slice(rows)
        self._buffer = rest.to_batches()
        self._buffered_rows, self._buffered_bytes = rest.num_rows, rest.nbytes

    def close(self) -> int:
        """Write what is buffered and close the file; returns the row count."""
        if self._buffered_rows:
            self._flush(self._buffered_rows)
        self._writer.close()
        return self.rows

    def abort(self) -> None:
        """Close the file without flushing (its owner deletes it)."""
        self._writer.close()


def file_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """The rows of a Parquet file as batches, read with bounded buffers (no pre-buffering of the whole file)."""
    with pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20) as file:
        yield from file.iter_batches(batch_size=READ_BATCH_ROWS)


def write_batches(path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch], label: str,
                  row_group_rows: int | None = None) -> int:
    """Stream ``batches`` into ``path`` in row groups of at most ``row_group_rows`` (None: :data:`ROW_GROUP_ROWS`);
    returns the row count (nothing is left behind on failure)."""
    writer = SnapshotWriter(path, schema, label, row_group_rows)
    try:
        for batch in batches:
            writer.write(batch)
    except BaseException:
        writer.abort()
        path.unlink(missing_ok=True)
        raise
    return writer.close()


def sampled(path: Path, fraction: float, seed: int) -> Iterator[pa.RecordBatch]:
    """The rows of ``path`` that ``DataFrame.sample(frac=fraction, random_state=seed)`` keeps, in file order."""
    n = pq.ParquetFile(path).metadata.num_rows
    keep = np.sort(np.random.RandomState(seed).choice(n, size=round(fraction * n), replace=False))
    offset = 0
    for batch in file_batches(path):
        lo, hi = np.searchsorted(keep, [offset, offset + batch.num_rows])
        if hi > lo:
            yield batch.take(pa.array(keep[lo:hi] - offset))
        offset += batch.num_rows


@dataclass(frozen=True)
class SnapshotStats:
    """What went into the snapshot."""

    rows: int
    rows_read: int
    """Rows read from the source by this run (before the sample)."""
    previous_rows: int
    """Rows copied from the previous snapshot (``incremental: append``)."""
    schema: pa.Schema


def write_snapshot(path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch], *, label: str,
                   fraction: float, seed: int, previous: Path | None, scratch: Path,
                   row_group_rows: int | None = None) -> SnapshotStats:
    """Write the snapshot: the previous snapshot's rows (if any), then this run's rows (sampled).

    Args:
        path: the snapshot file.
        schema: the schema of ``batches``.
        batches: this run's rows.
        label: the source, for messages.
        fraction: ``sample_fraction`` (1: every row).
        seed: the sample's seed.
        previous: the previous snapshot to append to, or ``None``.
        scratch: a folder for the unsampled rows (emptied by the caller).
        row_group_rows: the most rows per row group of the snapshot; None: :data:`ROW_GROUP_ROWS`.

    Raises:
        IngestError: no rows (or none left by the sample), or the previous snapshot's columns differ.
    """
    raw = scratch / "rows.parquet" if fraction < 1 or previous is not None else path
    rows_read = write_batches(raw, schema, batches, label, row_group_rows)
    if rows_read == 0:
        raw.unlink()
        raise IngestError(f"source {label} has no data rows ({len(schema)} columns, 0 rows); point the source at "
                          "data that has rows")
    if raw == path:
        return SnapshotStats(rows_read, rows_read, 0, widen_int_nulls(path, schema, scratch, label, row_group_rows))
    new: Iterable[pa.RecordBatch] = sampled(raw, fraction, seed) if fraction < 1 else file_batches(raw)
    old: Iterable[pa.RecordBatch] = ()
    if previous is not None:
        schema = unify([(f"the previous snapshot {previous}", pq.read_schema(previous).remove_metadata()),
                        (label, schema)])
        old = file_batches(previous)
    previous_rows = pq.ParquetFile(previous).metadata.num_rows if previous is not None else 0
    rows = write_batches(path, schema, itertools.chain(old, new), label, row_group_rows)
    raw.unlink()
    log.info("sample fraction %.4g seed %d: rows in %d out %d; previous snapshot rows %d", fraction, seed, rows_read,
             rows - previous_rows, previous_rows)
    if rows == previous_rows:
        path.unlink()
        raise IngestError(f"sample_fraction {fraction} of {rows_read} rows in {label} leaves 0 rows; raise "
                          "sample_fraction")
    return SnapshotStats(rows, rows_read, previous_rows, widen_int_nulls(path, schema, scratch, label,
                                                                         row_group_rows))


def widen_int_nulls(path: Path, schema: pa.Schema, scratch: Path, label: str, row_group_rows: int | None = None
                    ) -> pa.Schema:
    """Rewrite the integer columns of ``path`` that have a missing value as ``float64`` (what pandas makes of them,
    so every batch of the snapshot reads as the same dtype), in row groups of at most ``row_group_rows``; returns
    the file's schema."""
    meta = pq.ParquetFile(path).metadata
    nulls = set()
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            stats = meta.row_group(g).column(c).statistics
            if stats is None or not stats.has_null_count or stats.null_count > 0:
                nulls.add(meta.row_group(g).column(c).path_in_schema)
    widen = [f.name for f in schema if pa.types.is_integer(f.type) and f.name in nulls]
    if not widen:
        return schema
    wide = pa.schema([pa.field(f.name, pa.float64()) if f.name in widen else f for f in schema])
    tmp = scratch / "widened.parquet"
    write_batches(tmp, wide, file_batches(path), label, row_group_rows)
    tmp.replace(path)
    log.info("integer columns with missing values stored as float64: %s", ", ".join(widen))
    return wide


def pandas_dtypes(schema: pa.Schema) -> dict[str, str]:
    """Column name to the pandas dtype name a reader of the snapshot gets, in column order."""
    return {str(c): str(t) for c, t in schema.empty_table().to_pandas().dtypes.items()}
