"""Splitting a staged input into partitions of consecutive rows, and reading one partition.

A partition is a row range ``[start, stop)`` of the staged snapshot; each is scored by its own mapped task. Reading
one decodes only the snapshot's row groups that overlap the range, and only the columns asked for (the model's
inputs and the id column), never the whole file.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.tasks.scoring.config import ScoringError
from kiln.tasks.spec.scoring import MAX_PARTITIONS

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class Partition:
    """Rows ``[start, stop)`` of the staged input, the ``index``-th partition of its run."""

    index: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        """The partition's row count."""
        return self.stop - self.start

    def to_dict(self) -> dict[str, int]:
        """A JSON-safe dict (what the mapped ``score`` task receives)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Partition:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: not a partition (missing keys, an empty or negative range).
        """
        try:
            part = cls(index=int(data["index"]), start=int(data["start"]), stop=int(data["stop"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a partition: {data!r} ({exc})") from None
        if part.index < 0 or part.start < 0 or part.stop <= part.start:
            raise ValueError(f"not a partition: {data!r} (needs index >= 0 and 0 <= start < stop)")
        return part


def plan_partitions(rows: int, partition_rows: int) -> list[Partition]:
    """``rows`` split into consecutive partitions of ``partition_rows`` (the last one shorter).

    Raises:
        ScoringError: no rows, or more than :data:`MAX_PARTITIONS` partitions (naming the least ``partition_rows``
            that fits).
    """
    if partition_rows < 1:
        raise ScoringError(f"Param 'partition_rows': must be at least 1, found {partition_rows}")
    if rows < 1:
        raise ScoringError("Param 'input': the input has no rows; nothing to score")
    count = math.ceil(rows / partition_rows)
    if count > MAX_PARTITIONS:
        raise ScoringError(f"Param 'partition_rows': {rows} rows in partitions of {partition_rows} make {count} "
                           f"partitions, more than the {MAX_PARTITIONS} one run may map; give at least "
                           f"{math.ceil(rows / MAX_PARTITIONS)}")
    return [Partition(i, i * partition_rows, min(rows, (i + 1) * partition_rows)) for i in range(count)]


def read_partition(snapshot: Path, partition: Partition, columns: list[str]) -> pa.Table:
    """The ``columns`` of ``partition``'s rows of the Parquet file ``snapshot``.

    Raises:
        ScoringError: the file has fewer rows than the partition names (a partition of another input).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(snapshot)
    meta = pf.metadata
    if partition.stop > meta.num_rows:
        raise ScoringError(f"partition {partition.index} names rows {partition.start}..{partition.stop}, but the "
                           f"staged input {snapshot} has {meta.num_rows}; plan the partitions of this input again")
    groups, first, offset = [], None, 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if offset < partition.stop and offset + n > partition.start:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    table = pf.read_row_groups(groups, columns=columns, use_threads=True) if groups else \
        pa.schema([pf.schema_arrow.field(c) for c in columns]).empty_table()
    return table.slice(partition.start - (first or 0), partition.rows)
