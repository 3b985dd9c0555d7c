"""The passes of the ``clean`` step over a snapshot that need not fit in memory.

What is held: a keep-mask of one byte per row, during deduplication a 64-bit hash per row, and while one rule
runs one coerced column of the rows still kept (at most 8 bytes a row for a numeric column). Fill statistics and
IQR quartiles are computed with pandas on that whole column, so they are exact and equal to what the in-memory
step computed. Pass 1 (:meth:`SnapshotPasses.scan`) reads record batches to coerce, count and hash; the rules
then read one column at a time; pass 2 (:meth:`SnapshotPasses.write`) applies them batch by batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kiln.tasks.features.batches import dictionary_columns, iter_frames, iter_tables, to_frame
from kiln.tasks.features.cleaning_rules import CleanError, ColumnCoercion, Rules, as_label, as_number
from kiln.tasks.spec import ColumnCleaning

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


@dataclass
class Edits:
    """What pass 2 applies per column: fill values, clip bounds and the whole column's resulting dtype."""

    fills: dict[str, Any] = field(default_factory=dict)
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    dtypes: dict[str, Any] = field(default_factory=dict)


@dataclass
class SnapshotPasses:
    """The kept columns of one snapshot file, read in record batches of ``batch_rows``."""

    pf: pq.ParquetFile
    dtypes: dict[str, Any]
    coercions: dict[str, ColumnCoercion]
    batch_rows: int

    def scan(self, target: str, hash_rows: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Pass 1: observe every coercion; return the rows whose target is present and, if ``hash_rows``, a
        64-bit hash per row of the coerced kept columns."""
        import pandas as pd

        n = self.pf.metadata.num_rows
        present = np.zeros(n, dtype=bool)
        hashes = np.zeros(n, dtype=np.uint64) if hash_rows else None
        for offset, frame in iter_frames(self.pf, list(self.coercions), self.batch_rows, self.dtypes):
            canon = {c: coercion.observe(frame[c]) for c, coercion in self.coercions.items()}
            stop = offset + len(frame)
            present[offset:stop] = canon[target].notna().to_numpy()
            if hashes is not None:
                hashes[offset:stop] = pd.util.hash_pandas_object(pd.DataFrame(canon), index=False).to_numpy()
        return present, hashes

    def column(self, name: str, keep: np.ndarray) -> pd.Series:
        """The coerced values of column ``name`` in the rows ``keep`` marks."""
        table = self.pf.read(columns=[name], use_pandas_metadata=False).filter(pa.array(keep))
        return self.coercions[name].apply(to_frame(table, self.dtypes)[name])

    def write(self, path: Path, keep: np.ndarray, edits: Edits) -> None:
        """Pass 2: write the kept rows, coerced, filled and clipped, to ``path`` batch by batch."""
        writer: pq.ParquetWriter | None = None
        offset = 0
        try:
            for batch in iter_tables(self.pf, list(self.coercions), self.batch_rows):
                rows = keep[offset:offset + batch.num_rows]
                offset += batch.num_rows
                frame = to_frame(batch.filter(pa.array(rows)), self.dtypes)
                for c, coercion in self.coercions.items():
                    s = coercion.apply(frame[c])
                    if c in edits.fills:
                        s = s.fillna(edits.fills[c])
                    if c in edits.bounds:
                        s = s.clip(lower=edits.bounds[c][0], upper=edits.bounds[c][1])
                    frame[c] = s.astype(edits.dtypes[c]) if c in edits.dtypes else s
                table = pa.Table.from_pandas(frame, preserve_index=False,
                                             schema=writer.schema if writer is not None else None)
                writer = writer or pq.ParquetWriter(path, table.schema, use_dictionary=dictionary_columns(table.schema))
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()


def first_occurrences(hashes: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``keep`` less every row whose hash an earlier kept row has (the first occurrence stays)."""
    rows = np.flatnonzero(keep)
    _, first = np.unique(hashes[rows], return_index=True)  # return_index sorts stably: the first occurrence
    out = np.zeros_like(keep)
    out[rows[first]] = True
    return out


def apply_missing(passes: SnapshotPasses, keep: np.ndarray, column: str, ctype: str, policy: ColumnCleaning,
                  rules: Rules, edits: Edits) -> None:
    """Apply ``policy.missing`` to one column: drops clear ``keep`` in place, fills go into ``edits``.

    Raises:
        CleanError: the column is wholly missing and its fill statistic cannot be computed, or the rule removed
            the last rows.
    """
    how, rows = policy.missing or "keep", int(keep.sum())
    if how == "keep":
        rules.record("missing_keep", column, rows, rows)
        return
    s = passes.column(column, keep)
    missing = s.isna().to_numpy()
    n_missing = int(missing.sum())
    if n_missing == 0:
        rules.record(f"missing_{how}", column, rows, rows)
        return
    if how == "drop_row":
        keep[np.flatnonzero(keep)[missing]] = False
        rules.record("missing_drop_row", column, rows, rows - n_missing)
        return
    if how == "constant":
        value: Any = as_number(policy.fill_value) if ctype == "numeric" else as_label(policy.fill_value)
    elif n_missing == rows:
        raise CleanError(f"column '{column}' is entirely missing, so its {how} cannot be computed; use "
                         "missing: constant, drop the column (type: ignore) or fix the data")
    elif how == "mean":
        value = float(s.mean())
    elif how == "median":
        value = float(s.median())
    else:
        value = s.mode(dropna=True).iloc[0]  # the smallest of the most frequent values: deterministic
        value = value.item() if hasattr(value, "item") else value
    edits.fills[column] = value
    edits.dtypes[column] = s.fillna(value).dtype
    rules.record(f"missing_{how}", column, rows, rows, n_missing, f"filled with {value!r}")


def apply_outliers(passes: SnapshotPasses, keep: np.ndarray, column: str, policy: ColumnCleaning, rules: Rules,
                   edits: Edits) -> None:
    """Clip or drop values outside ``[Q1 - k*IQR, Q3 + k*IQR]`` (missing values are left alone)."""
    rows = int(keep.sum())
    s = passes.column(column, keep)
    if column in edits.fills:
        s = s.fillna(edits.fills[column])
    if s.notna().sum() == 0:
        rules.record(f"outliers_{policy.outliers}", column, rows, rows)
        return
    q1, q3 = (float(q) for q in s.quantile([0.25, 0.75]))
    k = policy.iqr_factor
    low, high = q1 - k * (q3 - q1), q3 + k * (q3 - q1)
    outside = ((s < low) | (s > high)).to_numpy()
    detail = f"bounds [{low:.6g}, {high:.6g}]"
    if policy.outliers == "clip_iqr":
        edits.bounds[column] = (low, high)
        edits.dtypes[column] = s.clip(lower=low, upper=high).dtype
        rules.record("outliers_clip_iqr", column, rows, rows, int(outside.sum()), detail)
        return
    keep[np.flatnonzero(keep)[outside]] = False
    rules.record("outliers_drop_iqr", column, rows, rows - int(outside.sum()), 0, detail)
