"""SQL sources: a query through a SQLAlchemy URL (an Airflow connection's), streamed as record batches.

The query may bind the run's data interval as ``:data_interval_start`` and ``:data_interval_end`` (timezone-aware
timestamps). A run without a data interval (a manual run of an unscheduled DAG, a run outside Airflow) binds the
Unix epoch and the time ``ingest`` started: every row up to now. The rows are fetched with a server-side cursor
(``stream_results``) in blocks of :data:`FETCH_ROWS`, so memory holds one block whatever the result's size, and
``source.sql.max_rows`` bounds the result.

Column types come from the values: the first block fixes each column's type (a column with no value in it waits
for later blocks, up to one row group, then is ``float64``); ``NUMERIC`` values become ``float64``, UUIDs text.
"""

from __future__ import annotations

import decimal
import logging
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from kiln.tasks.sources.errors import IngestError, SourceUnreachableError

log = logging.getLogger(__name__)

FETCH_ROWS = 50_000
#: Rows read before a column with no value yet is settled as ``float64``.
SETTLE_ROWS = 1_000_000
INTERVAL_PARAMS = ("data_interval_start", "data_interval_end")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class QueryRead:
    """A query's result as batches; after iteration, :attr:`rows` holds the row count."""

    conn_id: str
    query: str
    parameters: dict[str, datetime]
    max_rows: int
    rows: int = 0
    schema: pa.Schema | None = None
    _pending: list[list[tuple[Any, ...]]] = field(default_factory=list)

    def manifest(self) -> dict[str, Any]:
        """What the manifest records: the connection id, the query, its parameters (ISO 8601) and the rows."""
        return {"conn_id": self.conn_id, "query": self.query,
                "parameters": {k: v.isoformat() for k, v in self.parameters.items()}, "rows": self.rows}


def bind_parameters(query: str, interval: tuple[datetime, datetime] | None, now: datetime) -> dict[str, datetime]:
    """The parameters ``query`` uses: the data interval, or (no interval) the Unix epoch and ``now``.

    Raises:
        IngestError: the query uses a bound parameter other than the data interval's.
    """
    from sqlalchemy import text

    used = set(text(query)._bindparams)  # noqa: SLF001  (the names SQLAlchemy parsed out of the query)
    unknown = sorted(used - set(INTERVAL_PARAMS))
    if unknown:
        raise IngestError(f"source.sql.query uses the parameter(s) {', '.join(':' + u for u in unknown)}; only "
                          ":data_interval_start and :data_interval_end are bound (write other values into the "
                          "query, or escape a literal colon as \\:)")
    start, end = interval if interval is not None else (EPOCH, now)
    values = {"data_interval_start": _aware(start), "data_interval_end": _aware(end)}
    return {k: v for k, v in values.items() if k in used}


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def read_query(read: QueryRead, url: str) -> Iterator[pa.RecordBatch]:
    """Run the query and yield its rows as batches (see the module docstring for the types).

    Raises:
        SourceUnreachableError: the database cannot be reached (a retry may succeed).
        IngestError: the query fails, returns more than ``max_rows`` rows, or a column's values change type.
    """
    import sqlalchemy as sa
    from sqlalchemy.exc import SQLAlchemyError

    try:
        engine = sa.create_engine(url)
    except ImportError as exc:
        raise IngestError(f"Airflow connection '{read.conn_id}' (source.sql.conn_id) needs the database driver "
                          f"'{exc.name}', which is not installed: add it to the workers' Python environment "
                          "(PostgreSQL and SQLite need nothing more)") from None
    except SQLAlchemyError as exc:
        raise IngestError(f"Airflow connection '{read.conn_id}' (source.sql.conn_id) does not give a usable "
                          f"database URL: {_reason(exc)}; fix its type, host and schema") from None
    try:
        try:
            conn = engine.connect()
        except SQLAlchemyError as exc:
            raise SourceUnreachableError(f"cannot connect to the database of Airflow connection "
                                         f"'{read.conn_id}' (source.sql.conn_id): {_reason(exc)}; check the "
                                         "connection's host, port, database and credentials") from None
        with conn:
            try:
                result = conn.execution_options(stream_results=True, yield_per=FETCH_ROWS).execute(
                    sa.text(read.query), read.parameters)
                names = list(result.keys())
                for block in result.partitions(FETCH_ROWS):
                    yield from _batches(read, names, block)
            except SQLAlchemyError as exc:
                raise IngestError(f"source.sql.query failed on connection '{read.conn_id}': {_reason(exc)}; fix "
                                  "the query (it runs as written, with :data_interval_start/:data_interval_end "
                                  "bound)") from None
        if read._pending:  # noqa: SLF001
            yield from _settle(read, names, force=True)
    finally:
        engine.dispose()


def _batches(read: QueryRead, names: list[str], block: Sequence[Any]) -> Iterator[pa.RecordBatch]:
    read.rows += len(block)
    if read.rows > read.max_rows:
        raise IngestError(f"source.sql.query on connection '{read.conn_id}' returns more than source.sql.max_rows "
                          f"= {read.max_rows} rows; narrow the query (a WHERE on the data interval) or raise "
                          "source.sql.max_rows")
    read._pending.append([tuple(row) for row in block])  # noqa: SLF001
    yield from _settle(read, names, force=False)


def _settle(read: QueryRead, names: list[str], force: bool) -> Iterator[pa.RecordBatch]:
    """Fix the schema once every column has a type (or ``force``), then emit the pending blocks."""
    pending = read._pending  # noqa: SLF001
    if read.schema is None:
        columns = [_column(c for block in pending for c in (r[i] for r in block)) for i in range(len(names))]
        types = [a.type for a in columns]
        waiting = sum(len(b) for b in pending) < SETTLE_ROWS and not force
        if any(pa.types.is_null(t) for t in types) and waiting:
            return
        read.schema = pa.schema([pa.field(n, pa.float64() if pa.types.is_null(t) else t)
                                 for n, t in zip(names, types, strict=True)])
        log.info("query column types: %s", ", ".join(f"{f.name}={f.type}" for f in read.schema))
    for block in pending:
        yield _to_batch(read, names, block)
    pending.clear()


def _column(values: Iterator[Any]) -> pa.Array:
    return pa.array([_plain(v) for v in values])


def _plain(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def _to_batch(read: QueryRead, names: list[str], block: list[tuple[Any, ...]]) -> pa.RecordBatch:
    assert read.schema is not None
    arrays = []
    for i, f in enumerate(read.schema):
        try:
            arrays.append(pa.array([_plain(r[i]) for r in block], type=f.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            raise IngestError(f"source.sql.query column {names[i]} holds values of another type than {f.type} "
                              f"(its type from the first rows): {exc}; CAST the column to one type in the "
                              "query") from None
    return pa.RecordBatch.from_arrays(arrays, schema=read.schema)


def _reason(exc: BaseException) -> str:
    """The database's own message (first line), without SQLAlchemy's statement dump."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
