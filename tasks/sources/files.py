"""Local CSV and Parquet files as Arrow record batches, read in bounded blocks, never a whole file at once.

Column types follow pandas' ``read_csv``: ``int64`` when all present values are integers, ``float64`` for numbers
(an integer column with a missing value ends as ``float64``: see :func:`kiln.tasks.sources.snapshot.widen_int_nulls`),
``bool`` for ``True``/``False`` only, text otherwise; a column with no value at all is ``float64``. So a small
file's snapshot is the same as before.

A value that only appears late in a file (text at row 9 million of a number column) never fails the read: the types
are first guessed from the first block (:func:`guess_csv_schema`) and the file read once with them; if a later
value does not fit, that read is dropped (:class:`TypeGuessError`) and the robust two passes run: the first reads
every column as text, block by block, and settles each column's type from every value of every partition
(:func:`infer_csv_schema`), the second reads with those types.

Missing values are pandas' defaults (empty, ``NA``, ``NaN``, ``null``, ``None``, ...).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from kiln.tasks.sources.errors import IngestError

log = logging.getLogger(__name__)

#: pandas' default missing-value markers (``pandas.read_csv``'s ``na_values``).
NULL_VALUES = ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
               "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]
TRUE_VALUES = ["True", "TRUE", "true"]
FALSE_VALUES = ["False", "FALSE", "false"]
_BOOLS = pa.array(TRUE_VALUES + FALSE_VALUES)
#: Bytes per CSV block: a batch holds about this much text (a row must fit in one block). The reader's memory
#: grows with it (about 40 blocks' worth in flight: 4 MiB reads a 1 GB file in ~170 MiB of Arrow memory).
BLOCK_SIZE = 4 << 20
#: Rows per Parquet batch.
PARQUET_BATCH_ROWS = 65_536


class TypeGuessError(Exception):
    """A value late in a CSV file does not fit the type guessed from the first block (the exact passes follow)."""


@dataclass(frozen=True)
class LocalPart:
    """One file to read: where it is, what it is called in messages, its format."""

    path: Path
    label: str
    """The part's URI or path, as messages name it."""
    format: str
    stamp: tuple[int, int] | None = None
    """Size and modification time (ns) when the part was opened: a part that changes while it is read fails."""

    def check_unchanged(self) -> None:
        """Refuse a part whose size or modification time moved since :attr:`stamp`.

        Raises:
            IngestError: naming the part.
        """
        st = self.path.stat()
        if self.stamp is not None and (st.st_size, st.st_mtime_ns) != self.stamp:
            raise IngestError(f"source {self.label} changed while it was read ({self.stamp[0]} -> {st.st_size} "
                              "bytes); the snapshot would not match the manifest: run the pipeline again once the "
                              "file is written in full (write it under another name and rename it into place)")


def check_unique(names: Sequence[Any], label: str, where: str = "the header") -> None:
    """Refuse duplicate column names.

    Raises:
        IngestError: naming the duplicates and ``label``.
    """
    counts = Counter(str(n) for n in names)
    dupes = sorted(name for name, n in counts.items() if n > 1)
    if dupes:
        raise IngestError(f"source {label}: duplicate column names in {where}: {', '.join(dupes)}; "
                          "rename them so every column name is unique")


def _convert_options(types: dict[str, pa.DataType]) -> pacsv.ConvertOptions:
    return pacsv.ConvertOptions(column_types=types, null_values=NULL_VALUES, strings_can_be_null=True,
                                quoted_strings_can_be_null=True, true_values=TRUE_VALUES, false_values=FALSE_VALUES)


def csv_names(part: LocalPart, header: bool, column_names: list[str] | None) -> list[str]:
    """The column names of a CSV file: its header's, or ``column_names``, or ``col_0``, ``col_1``, ...

    Raises:
        IngestError: an empty file, duplicate names, ``column_names`` of the wrong length, unreadable text.
    """
    if part.path.stat().st_size == 0:
        raise IngestError(f"source {part.label} is empty (no columns, no rows); point source.uri at a file with data")
    try:
        with pacsv.open_csv(part.path, read_options=pacsv.ReadOptions(
                block_size=BLOCK_SIZE, autogenerate_column_names=not header)) as reader:
            found = list(reader.schema.names)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        raise _csv_error(part, exc) from None
    if header:
        check_unique(found, part.label)
        return found
    if column_names is None:
        return [f"col_{i}" for i in range(len(found))]
    if len(column_names) != len(found):
        raise IngestError(f"source {part.label}: source.column_names has {len(column_names)} names but the file has "
                          f"{len(found)} columns; give exactly one name per column")
    check_unique(column_names, part.label, where="source.column_names")
    return list(column_names)


def infer_csv_schema(parts: Sequence[LocalPart], names: list[str], header: bool) -> pa.Schema:
    """Pass 1: the type of every column, settled from every value of every part (see the module's docstring).

    Raises:
        IngestError: a part cannot be read as CSV (bad text, a ragged row).
    """
    state = dict.fromkeys(names, "null")
    has_null = dict.fromkeys(names, False)
    for part in parts:
        for batch in _csv_batches(part, names, header, dict.fromkeys(names, pa.string())):
            for name, column in zip(names, batch.columns, strict=True):
                has_null[name] = has_null[name] or column.null_count > 0
                if state[name] != "string":
                    state[name] = _widen(state[name], column.drop_null())
    types = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "string": pa.string(), "null": pa.float64()}
    fields = [pa.field(n, pa.float64() if state[n] == "int" and has_null[n] else types[state[n]]) for n in names]
    log.info("csv column types: %s", ", ".join(f"{f.name}={f.type}" for f in fields))
    return pa.schema(fields)


def _widen(state: str, values: pa.Array) -> str:
    """The narrowest type that holds the values seen so far (``state``) and ``values`` (no nulls)."""
    if len(values) == 0:
        return state
    if state in ("null", "int") and _casts(values, pa.int64()):
        return "int"
    if state in ("null", "int", "float") and _casts(values, pa.float64()):
        return "float"
    if state in ("null", "bool") and pc.all(pc.is_in(values, value_set=_BOOLS)).as_py():
        return "bool"
    return "string"


def _casts(values: pa.Array, to: pa.DataType) -> bool:
    # The CSV reader of pass 2 trims spaces around numbers; the cast does not, so try the trimmed values too.
    for candidate in (values, None):
        try:
            pc.cast(candidate if candidate is not None else pc.utf8_trim_whitespace(values), to)
            return True
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
    return False


def guess_csv_schema(part: LocalPart, names: list[str], header: bool) -> pa.Schema:
    """The column types of the first block of ``part`` (integers stay ``int64`` even with missing values).

    Raises:
        IngestError: the block cannot be read as CSV.
    """
    state = dict.fromkeys(names, "null")
    for batch in _csv_batches(part, names, header, dict.fromkeys(names, pa.string())):
        for name, column in zip(names, batch.columns, strict=True):
            state[name] = _widen(state[name], column.drop_null())
        break
    types = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "string": pa.string(),
             "null": pa.float64()}
    return pa.schema([pa.field(n, types[state[n]]) for n in names])


def csv_batches(part: LocalPart, names: list[str], header: bool, schema: pa.Schema,
                guessed: bool = False) -> Iterator[pa.RecordBatch]:
    """The part's rows as batches of ``schema``.

    Raises:
        TypeGuessError: ``guessed`` and a value does not fit (or the file does not parse: the exact passes say).
        IngestError: the part cannot be read with those types.
    """
    yield from _csv_batches(part, names, header, {f.name: f.type for f in schema}, guessed)


def _csv_batches(part: LocalPart, names: list[str], header: bool, types: dict[str, pa.DataType],
                 guessed: bool = False) -> Iterator[pa.RecordBatch]:
    read = pacsv.ReadOptions(block_size=BLOCK_SIZE, column_names=names, skip_rows=1 if header else 0)
    try:
        with pacsv.open_csv(part.path, read_options=read, convert_options=_convert_options(types)) as reader:
            yield from reader
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        if guessed:
            raise TypeGuessError(f"{part.label}: {exc}") from None
        raise _csv_error(part, exc) from None


def _csv_error(part: LocalPart, exc: BaseException) -> IngestError:
    return IngestError(f"cannot read source {part.label} as csv: {exc}. Check that the file is csv (UTF-8 text, the "
                       "same number of fields on every row) or set source.format to its real format")


def parquet_schema(part: LocalPart) -> pa.Schema:
    """The schema of a Parquet file, without a pandas index stored as columns, and without metadata.

    Raises:
        IngestError: not a Parquet file, or duplicate column names.
    """
    try:
        schema = pq.read_schema(part.path)
    except (pa.ArrowException, OSError) as exc:
        raise IngestError(f"cannot read source {part.label} as parquet: {exc}. Check that the file is parquet or "
                          "set source.format to its real format") from None
    check_unique(schema.names, part.label)
    index = {c for c in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)}
    return pa.schema([f for f in schema if f.name not in index])


def parquet_batches(part: LocalPart, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """The file's rows as batches of ``schema`` (row group by row group).

    Raises:
        IngestError: the file cannot be read.
    """
    try:
        # pre_buffer keeps every column chunk read until the file closes: memory would grow with the file's size.
        with pq.ParquetFile(part.path, pre_buffer=False, buffer_size=1 << 20) as file:
            for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=schema.names):
                yield conform(batch, schema, part.label)
    except (pa.ArrowException, OSError) as exc:
        raise IngestError(f"cannot read source {part.label} as parquet: {exc}") from None


def conform(batch: pa.RecordBatch, schema: pa.Schema, label: str) -> pa.RecordBatch:
    """``batch`` with the columns and types of ``schema`` (the order of ``schema``).

    Raises:
        IngestError: a column's values do not fit its type in ``schema``.
    """
    batch = batch.select(schema.names)
    if batch.schema.equals(schema):
        return batch
    try:
        return batch.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        bad = [f.name for f in schema if batch.schema.field(f.name).type != f.type]
        raise IngestError(f"source {label}: column(s) {', '.join(bad)} do not fit the snapshot's types "
                          f"({exc}); make the partitions' column types agree") from None


def unify(schemas: Sequence[tuple[str, pa.Schema]]) -> pa.Schema:
    """One schema for every part: the first part's column order; per column the common type (integers widen to
    ``float64`` next to floats, a column without values takes the other parts' type).

    Args:
        schemas: (label, schema) per part, in reading order.

    Raises:
        IngestError: a part whose columns differ from the first part's, or a column whose types cannot be
            reconciled, naming the part and the columns.
    """
    first_label, first = schemas[0]
    fields = {f.name: f.type for f in first}
    for label, schema in schemas[1:]:
        extra = [n for n in schema.names if n not in fields]
        missing = [n for n in fields if n not in schema.names]
        if extra or missing:
            said = "; ".join(s for s in (f"extra column(s) {', '.join(extra)}" if extra else "",
                                         f"missing column(s) {', '.join(missing)}" if missing else "") if s)
            raise IngestError(f"partition {label} has other columns than {first_label}: {said}. Every partition "
                              "must have the same columns: rewrite that partition or move it out of the source")
        for f in schema:
            common = _common(fields[f.name], f.type)
            if common is None:
                raise IngestError(f"partition {label}: column {f.name} is {f.type} where {first_label} has "
                                  f"{fields[f.name]}; every partition must hold the same column types: rewrite "
                                  "that partition or move it out of the source")
            fields[f.name] = common
    return pa.schema([pa.field(n, t) for n, t in fields.items()])


def _common(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    if a == b:
        return a
    if pa.types.is_null(a):
        return b
    if pa.types.is_null(b):
        return a
    numeric = (pa.types.is_integer, pa.types.is_floating)
    if any(t(a) for t in numeric) and any(t(b) for t in numeric):
        return pa.float64() if pa.types.is_floating(a) or pa.types.is_floating(b) else pa.int64()
    strings = (pa.types.is_string, pa.types.is_large_string)
    if any(t(a) for t in strings) and any(t(b) for t in strings):
        return pa.large_string()
    return None
