"""Writing the train/val/test split files from a cleaned Parquet file that need not fit in memory.

Each split's rows are written in the order the seeded split gave them (a shuffled order, so a contiguous range
of rows, which is what a training rank reads, is a random sample of the split). Getting rows from file order into
that order in bounded memory takes one bucketing pass: every record batch's rows go, by their output position,
to one of ``ceil(rows / group_rows)`` temporary Arrow files per split; each bucket is then read whole, sorted,
transformed and written as one row group of ``group_rows`` rows. Peak memory: one record batch plus one bucket.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kiln.tasks.features.batches import (
    BATCH_ROWS,
    GROUP_ROWS,
    dictionary_columns,
    file_dtypes,
    iter_tables,
    to_frame,
)

if TYPE_CHECKING:
    from kiln.tasks.features.transform import FeatureTransform

log = logging.getLogger(__name__)

_POSITION = "__kiln_position__"


def write_split_files(clean_file: Path, parts: dict[str, np.ndarray], files: dict[str, Path],
                      raw_files: dict[str, Path], transform: FeatureTransform, target_column: str, *,
                      batch_rows: int = BATCH_ROWS, group_rows: int = GROUP_ROWS) -> None:
    """Write each split's features (``f0..f{d-1}`` and ``target_column``), in row groups of ``group_rows``.

    Args:
        clean_file: the cleaned rows.
        parts: split name -> the row numbers of ``clean_file`` in that split, in output order.
        files: split name -> the features file to write.
        raw_files: split name -> a file to also write that split's raw rows to (e.g. ``test`` for the raw test
            rows), in the same order.
        transform: the fitted transform.
        target_column: the name of the encoded label column.
        batch_rows: rows per record batch read from ``clean_file``.
        group_rows: rows per row group written (and per temporary bucket).

    Raises:
        ValueError: from the transform (a non-number in a numeric column, an unseen label).
    """
    pf = pq.ParquetFile(clean_file)
    n = pf.metadata.num_rows
    owner, position = np.full(n, -1, dtype=np.int8), np.zeros(n, dtype=np.int64)
    for i, rows in enumerate(parts.values()):
        owner[rows], position[rows] = i, np.arange(len(rows))
    with tempfile.TemporaryDirectory(dir=Path(files[next(iter(files))]).parent, prefix=".split-buckets-") as tmp:
        buckets = _Buckets(Path(tmp), pf.schema_arrow.append(pa.field(_POSITION, pa.int64())))
        try:
            for batch in iter_tables(pf, None, batch_rows):
                _scatter(batch, owner, position, buckets, group_rows, list(parts))
                owner, position = owner[batch.num_rows:], position[batch.num_rows:]
        finally:
            buckets.close()
        dtypes = file_dtypes(pf)
        for split, rows in parts.items():
            _write_split(buckets, split, -(-len(rows) // group_rows), files[split], raw_files.get(split),
                         pf.schema_arrow, dtypes, transform, target_column)


class _Buckets:
    """Temporary Arrow IPC files, one per (split, bucket), opened on first use."""

    def __init__(self, folder: Path, schema: pa.Schema) -> None:
        self.folder, self.schema = folder, schema
        self._writers: dict[tuple[str, int], pa.ipc.RecordBatchStreamWriter] = {}

    def path(self, split: str, bucket: int) -> Path:
        return self.folder / f"{split}-{bucket:06d}.arrow"

    def append(self, split: str, bucket: int, batch: pa.Table) -> None:
        key = (split, bucket)
        if key not in self._writers:
            self._writers[key] = pa.ipc.new_stream(str(self.path(split, bucket)), self.schema)
        self._writers[key].write_table(batch)

    def read(self, split: str, bucket: int) -> pa.Table:
        path = self.path(split, bucket)
        with pa.ipc.open_stream(str(path)) as reader:
            table = reader.read_all()
        path.unlink()
        return table

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def _scatter(batch: pa.Table, owner: np.ndarray, position: np.ndarray, buckets: _Buckets, group_rows: int,
             splits: list[str]) -> None:
    """Append each row of ``batch`` (with its output position) to its split's bucket."""
    owner, position = owner[:batch.num_rows], position[:batch.num_rows]
    for i, split in enumerate(splits):
        rows = np.flatnonzero(owner == i)
        if rows.size == 0:
            continue
        bucket_of = position[rows] // group_rows
        order = np.argsort(bucket_of, kind="stable")
        rows, bucket_of = rows[order], bucket_of[order]
        starts = np.flatnonzero(np.r_[True, bucket_of[1:] != bucket_of[:-1]])
        for start, stop in zip(starts, [*starts[1:], len(rows)], strict=True):
            part = batch.take(pa.array(rows[start:stop]))
            part = part.append_column(_POSITION, pa.array(position[rows[start:stop]]))
            buckets.append(split, int(bucket_of[start]), part)


def _write_split(buckets: _Buckets, split: str, n_buckets: int, path: Path, raw_path: Path | None,
                 raw_schema: pa.Schema, dtypes: dict[str, object], transform: FeatureTransform,
                 target_column: str) -> None:
    """Sort each bucket of ``split`` by position, transform it, and write it as one row group."""
    import pandas as pd

    names = [f"f{i}" for i in range(transform.input_dim)]
    empty = pd.DataFrame(np.zeros((0, len(names)), np.float32), columns=names)
    empty[target_column] = np.zeros(0, np.int64 if transform.classes is not None else np.float32)
    schema = pa.Schema.from_pandas(empty, preserve_index=False)
    writer = pq.ParquetWriter(path, schema, use_dictionary=dictionary_columns(schema))
    raw_writer = (pq.ParquetWriter(raw_path, raw_schema, use_dictionary=dictionary_columns(raw_schema))
                  if raw_path is not None else None)
    try:
        for bucket in range(n_buckets):
            table = buckets.read(split, bucket)
            table = table.take(pa.array(np.argsort(table.column(_POSITION).to_numpy()))).drop_columns(_POSITION)
            part = to_frame(table, dtypes)
            frame = pd.DataFrame(transform.transform(part), columns=names)
            frame[target_column] = transform.encode_target(part[transform.target])
            writer.write_table(pa.Table.from_pandas(frame, schema=writer.schema, preserve_index=False))
            if raw_writer is not None:
                raw_writer.write_table(table.cast(raw_schema))
    finally:
        writer.close()
        if raw_writer is not None:
            raw_writer.close()
