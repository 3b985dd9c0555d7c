"""Scoring one partition: its rows checked (:mod:`kiln.tasks.scoring.rows`), the accepted ones transformed and
predicted in batches of ``batch_size`` with the bundle's own runtime (the load path of the model server), and the
predictions and rejects written as Parquet with a ``part.json`` that lists their sha256.

The predictions hold, per accepted row: its id (the input's id column, or ``row``, its ordinal in the input), the
prediction (``label`` and ``probability_<class>`` per class for a classifier, ``value`` for a regressor: the model
server's answer as columns) and ``model_version``. The rejects hold the row's id, ``field`` and ``reason``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kiln.tasks.scoring.partition import Partition, read_partition
from kiln.tasks.scoring.rows import check_rows
from kiln.tasks.storage.artifacts import file_sha256, write_json

if TYPE_CHECKING:
    from kiln.tasks.bundle.load import Bundle

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.parquet"
REJECTS_FILE = "rejects.parquet"
PART_FILE = "part.json"
VERSION_COLUMN = "model_version"
PROBABILITY_PREFIX = "probability_"


@dataclass(frozen=True)
class PartitionResult:
    """What scoring one partition wrote (its ``part.json``)."""

    index: int
    start: int
    stop: int
    scored: int
    """Rows predicted."""
    rejected: int
    """Rows set aside in the rejects file."""
    version: str
    files: dict[str, str]
    """File name to sha256, for the partition's predictions and rejects."""
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (``part.json`` and the mapped task's XCom)."""
        return asdict(self)


def prediction_columns(bundle: Bundle, y: np.ndarray) -> dict[str, pa.Array]:
    """The prediction columns of the model outputs ``y`` (:meth:`Bundle.predict_features`)."""
    if bundle.classes is None:
        return {"value": pa.array(np.asarray(y, dtype=np.float32))}
    classes = list(bundle.classes)
    best = y.argmax(axis=1).astype(np.int32) if len(y) else np.zeros(0, np.int32)
    columns: dict[str, pa.Array] = {"label": pa.DictionaryArray.from_arrays(pa.array(best), pa.array(classes))}
    for i, name in enumerate(classes):
        columns[f"{PROBABILITY_PREFIX}{name}"] = pa.array(np.ascontiguousarray(y[:, i], dtype=np.float32))
    return columns


def run_score_partition(bundle: Bundle, version: str, snapshot: Path, partition: Partition, out_dir: Path, *,
                        id_column: str | None, batch_size: int) -> PartitionResult:
    """Score ``partition`` of the staged ``snapshot`` with ``bundle``; write its files into ``out_dir``.

    Args:
        bundle: the loaded model bundle.
        version: the model version, written in every prediction row.
        snapshot: the staged input (``snapshot.parquet``).
        partition: the rows to score.
        out_dir: an empty folder that the caller publishes once this returns.
        id_column: the input's id column (None: rows are named by their ordinal).
        batch_size: rows per model call.

    Returns:
        The partition's counts and file hashes.

    Raises:
        ScoringError: the snapshot does not hold the partition's rows.
        BundleError, RuntimeError: the model failed (nothing is published; the run has no manifest).
    """
    start = time.perf_counter()
    columns = list(dict.fromkeys([*bundle.input_columns, *([id_column] if id_column else [])]))
    checked = check_rows(read_partition(snapshot, partition, columns), bundle.transform, id_column, partition.start)
    n = len(checked.frame)
    outputs = [bundle.predict_features(bundle.transform.transform(checked.frame.iloc[i:i + batch_size]))
               for i in range(0, n, batch_size)]
    y = np.concatenate(outputs) if outputs else bundle.predict_features(
        np.zeros((0, bundle.transform.input_dim), np.float32))
    id_name = checked.rejects.column_names[0]
    table = pa.table({id_name: checked.ids, **prediction_columns(bundle, y),
                      VERSION_COLUMN: pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)),
                                                                     pa.array([version]))})
    # Dictionary pages only for the columns of few values: trying them on the probabilities costs more than it saves.
    pq.write_table(table, out_dir / PREDICTIONS_FILE, compression="snappy", use_dictionary=["label", VERSION_COLUMN])
    pq.write_table(checked.rejects, out_dir / REJECTS_FILE, compression="snappy")
    files = {name: file_sha256(out_dir / name) for name in (PREDICTIONS_FILE, REJECTS_FILE)}
    result = PartitionResult(index=partition.index, start=partition.start, stop=partition.stop, scored=n,
                             rejected=checked.rejects.num_rows, version=version, files=files,
                             seconds=round(time.perf_counter() - start, 3))
    write_json(out_dir / PART_FILE, result.to_dict())
    log.info("partition %d (rows %d..%d): %d rows in, %d scored, %d rejected, %.2f s", partition.index,
             partition.start, partition.stop, partition.rows, n, result.rejected, result.seconds)
    return result
