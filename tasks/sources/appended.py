"""Rows a retrain appends to the snapshot: the labelled captured rows a monitor run exported
(``monitoring.retrain.append_labelled``, :mod:`kiln.tasks.monitoring.labelled`).

The monitor's retrain Asset event names them in its extra, ``{"kiln_retrain": {"labelled": <report key>}}``;
``ingest`` appends ``<key>/labelled.parquet`` after the source's rows. Each snapshot column takes the file's column
of that name cast to the snapshot's type (the label text to the target's type; a captured input, float64, to an
integer column only where no value has a fraction), or nulls where the file has none; the file's other columns
are ignored. The snapshot is rewritten batch by batch (memory stays at one row group) and replaces the old file
only once whole. An integer column that gains a missing value is stored as float64, as for any source
(:func:`kiln.tasks.sources.snapshot.widen_int_nulls`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kiln.tasks.monitoring.labelled import LABELLED_FILE, MAX_LABELLED_ROWS
from kiln.tasks.sources.errors import IngestError
from kiln.tasks.sources.snapshot import file_batches, widen_int_nulls, write_batches
from kiln.tasks.storage.artifacts import ArtifactNotFoundError, ArtifactStore, file_sha256

log = logging.getLogger(__name__)

_FIX = ("point the event at a monitor report folder that holds it, or run the pipeline again without it "
        "(monitoring.retrain.append_labelled: false stops the monitor naming one)")


@dataclass(frozen=True)
class LabelledFile:
    """One labelled file to append (the manifest's ``appended`` entry, without :attr:`path`)."""

    key: str
    """The monitor report folder's artifact key."""
    rows: int
    sha256: str
    """sha256 of its ``labelled.parquet``."""
    path: Path

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict: key, rows, sha256."""
        return {k: v for k, v in asdict(self).items() if k != "path"}


def labelled_keys(events: Sequence[Mapping[str, Any]]) -> list[str]:
    """The report keys that the events' ``kiln_retrain.labelled`` name, in event order, each once (events queued
    while a run was pending fold into it)."""
    keys = []
    for event in events:
        retrain = event.get("kiln_retrain")
        if isinstance(retrain, Mapping) and retrain.get("labelled"):
            keys.append(str(retrain["labelled"]))
    return list(dict.fromkeys(keys))


def open_labelled(keys: Sequence[str], store: ArtifactStore | None) -> list[LabelledFile]:
    """Find each key's ``labelled.parquet`` in ``store`` and check the rows' bound.

    Raises:
        IngestError: no store, a key without the file (or not a Parquet file), or more than
            :data:`MAX_LABELLED_ROWS` rows in all.
    """
    if not keys:
        return []
    if store is None:
        raise IngestError(f"the retrain event names labelled rows ({', '.join(keys)}) but this run has no artifact "
                          "store to read them from: run the pipeline from its DAG, or give IngestRun.store")
    files = []
    for key in keys:
        try:
            path = store.path(key) / LABELLED_FILE
        except (ArtifactNotFoundError, ValueError) as exc:
            raise IngestError(f"labelled rows {key!r} (kiln_retrain.labelled of the retrain event): not in the "
                              f"artifact store ({exc}); {_FIX}") from None
        if not path.is_file():
            raise IngestError(f"labelled rows {store.uri(key)}/{LABELLED_FILE} (kiln_retrain.labelled of the retrain "
                              f"event): no such file; {_FIX}")
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise IngestError(f"labelled rows {store.uri(key)}/{LABELLED_FILE}: not a Parquet file ({exc}); "
                              f"{_FIX}") from None
        files.append(LabelledFile(key, rows, file_sha256(path), path))
    total = sum(f.rows for f in files)
    if total > MAX_LABELLED_ROWS:
        raise IngestError(f"labelled rows {', '.join(keys)}: {total} rows, more than the {MAX_LABELLED_ROWS} a "
                          "retrain appends; the monitor exports at most that many per report, so a file was "
                          f"altered or too many retrain events folded into this run: {_FIX}")
    return files


def append_labelled(snapshot: Path, files: Sequence[LabelledFile], scratch: Path, label: str,
                    row_group_rows: int | None = None) -> tuple[int, pa.Schema]:
    """Rewrite ``snapshot`` with the rows of ``files`` after its own.

    Args:
        snapshot: the snapshot just written.
        files: the labelled files (:func:`open_labelled`).
        scratch: a folder beside ``snapshot`` (same file system: the new file replaces it by a rename).
        label: the source, for messages.
        row_group_rows: the most rows per row group of the snapshot; None: the snapshot's default.

    Returns:
        The snapshot's row count and schema now.

    Raises:
        IngestError: a value that does not cast to its snapshot column's type (naming the file and the column),
            or a file sharing no column with the snapshot. ``snapshot`` is then as it was.
    """
    schema = pq.read_schema(snapshot).remove_metadata()
    for file in files:
        names = pq.read_schema(file.path).names
        if not set(names) & set(schema.names):
            raise IngestError(f"labelled rows {file.key}/{LABELLED_FILE} share no column with the snapshot of "
                              f"{label} (theirs: {', '.join(names)}); {_FIX}")
        missing, ignored = [n for n in schema.names if n not in names], [n for n in names if n not in schema.names]
        if missing or ignored:
            log.warning("labelled rows %s: snapshot columns filled with nulls: %s; their columns ignored: %s",
                        file.key, ", ".join(missing) or "none", ", ".join(ignored) or "none")
    tmp = scratch / "appended.parquet"
    batches = itertools.chain(file_batches(snapshot), *(_cast(f, schema) for f in files))
    rows = write_batches(tmp, schema, batches, label, row_group_rows)
    tmp.replace(snapshot)
    log.info("appended %d labelled rows from %s: snapshot %d rows", sum(f.rows for f in files),
             ", ".join(f.key for f in files), rows)
    return rows, widen_int_nulls(snapshot, schema, scratch, label, row_group_rows)


def _cast(file: LabelledFile, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """The file's rows as batches of ``schema``."""
    for batch in file_batches(file.path):
        columns = []
        for field in schema:
            if field.name not in batch.schema.names:
                columns.append(pa.nulls(batch.num_rows, field.type))
                continue
            try:
                columns.append(pc.cast(batch.column(field.name), field.type, safe=True))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise IngestError(
                    f"labelled rows {file.key}/{LABELLED_FILE}: column {field.name!r} "
                    f"({batch.schema.field(field.name).type}) does not cast to the snapshot's {field.type} ({exc}); "
                    "fix the labels sent to /feedback for those requests (a label must be a value of the target's "
                    "type) and retrain again, or set monitoring.retrain.append_labelled: false") from None
        yield pa.RecordBatch.from_arrays(columns, schema=schema)
