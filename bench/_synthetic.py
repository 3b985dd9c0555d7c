"""A synthetic raw table for the data benchmarks: ``rows`` x 50 columns written to Parquet in chunks, so that
tables far larger than memory can be made.

Columns: 45 numeric ``x00..x44`` (normal, about 1 % missing), 4 categorical ``c0..c3`` (8 to 64 levels, about 1 %
missing) and the label ``label`` (3 classes from a random linear map of 5 numeric columns, about 0.5 % missing).
About 0.5 % of the rows repeat an earlier row of their chunk. Benchmarks only: the data means nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

N_NUMERIC, N_CATEGORICAL, LEVELS = 45, 4, (8, 16, 32, 64)
CHUNK_ROWS = 500_000


def write_synthetic_table(path: Path, rows: int, *, seed: int = 0, chunk_rows: int = CHUNK_ROWS) -> Path:
    """Write the table to ``path`` (Parquet, one row group per chunk) and return ``path``."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(5, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    writer = None
    try:
        for start in range(0, rows, chunk_rows):
            table = _chunk(rng, min(chunk_rows, rows - start), weights)
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    tmp.rename(path)
    return path


def _chunk(rng: np.random.Generator, n: int, weights: np.ndarray) -> pa.Table:
    x = rng.normal(size=(n, N_NUMERIC))
    label = np.array(["a", "b", "c"])[(x[:, :5] @ weights).argmax(1)].astype(object)
    x[rng.random((n, N_NUMERIC)) < 0.01] = np.nan
    label[rng.random(n) < 0.005] = None
    columns: dict[str, object] = {f"x{i:02d}": x[:, i] for i in range(N_NUMERIC)}
    for i, levels in enumerate(LEVELS):
        values = np.array([f"v{j}" for j in range(levels)], dtype=object)[rng.integers(0, levels, n)]
        values[rng.random(n) < 0.01] = None
        columns[f"c{i}"] = values
    columns["label"] = label
    repeat = rng.random(n) < 0.005
    source = rng.integers(0, n, n)
    order = np.where(repeat, np.minimum(source, np.arange(n)), np.arange(n))  # a repeat copies an earlier row
    return pa.table({name: pa.array(np.asarray(col)[order]) for name, col in columns.items()})
