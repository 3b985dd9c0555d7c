"""Reading a Parquet file in bounded memory: record batches as pandas frames with the dtypes of the whole file,
one column at a time, or one rank's contiguous share of the rows.

A batch converted on its own can get another dtype than the same column read whole (an integer column whose
batch has no nulls reads as ``int64``, the whole column as ``float64``); :func:`file_dtypes` fixes every column
to the dtype a whole-file ``pd.read_parquet`` gives, so streaming steps see the types the in-memory ones saw.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the step list imports this module's constants while a DAG file parses
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

#: Rows per record batch that the data steps convert to pandas (about 25 MiB for 50 float columns); larger
#: batches were no faster on 1 M rows and raised the peak by ~170 MiB.
BATCH_ROWS = 65_536
#: Rows per row group of the files the data steps write: the unit a training rank's shard is read in, and what
#: ``build_features`` transforms at once.
GROUP_ROWS = 65_536


def file_dtypes(pf: pq.ParquetFile) -> dict[str, object]:
    """The pandas dtype of every column as ``pd.read_parquet`` of the whole file would give it."""
    import numpy as np
    import pyarrow as pa

    empty = pf.schema_arrow.empty_table().to_pandas()
    dtypes: dict[str, object] = dict(empty.dtypes.items())
    for field in pf.schema_arrow:
        dtype = dtypes.get(field.name)
        widen = (pa.types.is_integer(field.type) and isinstance(dtype, np.dtype) and dtype.kind in "iu") or \
                (pa.types.is_boolean(field.type) and dtype == np.dtype(bool))
        if widen and _null_count(pf, field.name):
            dtypes[field.name] = np.dtype("float64") if pa.types.is_integer(field.type) else np.dtype(object)
    return dtypes


def empty_frame(pf: pq.ParquetFile) -> pd.DataFrame:
    """A frame with no rows and the whole file's columns and dtypes (for type inference)."""
    import pandas as pd

    return pd.DataFrame({c: pd.Series([], dtype=d) for c, d in file_dtypes(pf).items()})


def to_frame(batch: pa.RecordBatch | pa.Table, dtypes: dict[str, object]) -> pd.DataFrame:
    """``batch`` as a pandas frame whose columns have ``dtypes`` (see :func:`file_dtypes`)."""
    df = batch.to_pandas()
    for column in df.columns:
        if column in dtypes and df[column].dtype != dtypes[column]:
            df[column] = df[column].astype(dtypes[column])
    return df


def iter_tables(pf: pq.ParquetFile, columns: Sequence[str] | None = None, batch_rows: int = BATCH_ROWS
                ) -> Iterator[pa.Table]:
    """The rows of ``columns`` (all by default) in file order, in slices of at most ``batch_rows`` rows.

    A row group is read whole (with threads) and then sliced: ``ParquetFile.iter_batches`` with batches smaller
    than a row group was 6x slower and held more memory. Peak memory is therefore one row group of the columns
    read; the files the data steps read are written in row groups of at most ~1 M rows (ingest) or
    :data:`GROUP_ROWS`.
    """
    names = list(columns) if columns is not None else None
    for i in range(pf.metadata.num_row_groups):
        table = pf.read_row_group(i, columns=names, use_threads=True, use_pandas_metadata=False)
        for start in range(0, table.num_rows, batch_rows):
            yield table.slice(start, batch_rows)


def iter_frames(pf: pq.ParquetFile, columns: Sequence[str] | None = None, batch_rows: int = BATCH_ROWS,
                dtypes: dict[str, object] | None = None) -> Iterator[tuple[int, pd.DataFrame]]:
    """``(offset of the first row, frame)`` for each slice of :func:`iter_tables`, converted to pandas.

    Args:
        pf: the open file.
        columns: the columns to read.
        batch_rows: rows per batch (the last of a row group may be shorter).
        dtypes: the dtypes to convert to; default :func:`file_dtypes`.
    """
    dtypes = file_dtypes(pf) if dtypes is None else dtypes
    offset = 0
    for table in iter_tables(pf, columns, batch_rows):
        yield offset, to_frame(table, dtypes)
        offset += table.num_rows


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns worth dictionary-encoding when written: all but floating-point ones, whose values rarely
    repeat (encoding them anyway doubles the write time)."""
    import pyarrow as pa

    return [f.name for f in schema if not pa.types.is_floating(f.type)]


def shard_range(n_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of rank ``rank`` of ``world_size``: contiguous, sizes differing by at most one.

    Raises:
        ValueError: ``rank`` is not in ``0..world_size-1``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..world_size-1 and world_size >= 1, found rank {rank} of {world_size}")
    return n_rows * rank // world_size, n_rows * (rank + 1) // world_size


def iter_row_range(path: Path, start: int, stop: int, columns: Sequence[str] | None = None
                   ) -> Iterator[tuple[int, pa.Table]]:
    """Rows ``[start, stop)`` of a Parquet file as ``(offset within the range, table)`` pieces, one per row group
    that overlaps the range; no other row group is read."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    first = 0
    for i in range(pf.metadata.num_row_groups):
        rows = pf.metadata.row_group(i).num_rows
        if first < stop and first + rows > start:
            table = pf.read_row_group(i, columns=list(columns) if columns is not None else None,
                                      use_pandas_metadata=False)
            lo, hi = max(start - first, 0), min(stop - first, rows)
            yield first + lo - start, table.slice(lo, hi - lo)
        first += rows


def _null_count(pf: pq.ParquetFile, column: str) -> int:
    """Nulls in ``column``: from the row groups' statistics, or by reading the column where they are absent."""
    meta, total = pf.metadata, 0
    index = pf.schema_arrow.get_field_index(column)
    for i in range(meta.num_row_groups):
        stats = meta.row_group(i).column(index).statistics
        if stats is None or not stats.has_null_count:
            return pf.read(columns=[column], use_pandas_metadata=False).column(0).null_count
        total += stats.null_count
    return total
