"""The captured traffic and the feedback of a time window, read back from the artifact store.

The model server publishes one folder per flushed batch (:mod:`kiln.tasks.serving.capture`):

    <pipeline>/_capture/version=<version>/hour=<YYYY-MM-DDTHH>/<batch id>/capture.parquet
    <pipeline>/_feedback/hour=<YYYY-MM-DDTHH>/<batch id>/feedback.parquet

A window reads every batch of the hours it touches and keeps the rows whose ``received_at`` falls inside it. A
batch that cannot be read (a corrupt file, missing columns) or whose ``version`` column disagrees with its folder
is skipped and reported in :attr:`WindowRead.skipped`, never fatal: one bad file must not hide a day of traffic.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from kiln.tasks.serving.capture_format import (
    CAPTURE_FILE,
    FEEDBACK_FILE,
    FIXED_COLUMNS,
    HOUR_FORMAT,
    capture_hour_key,
    feedback_hour_key,
)
from kiln.tasks.storage.artifacts import (
    ArtifactNotFoundError,
    ArtifactStore,
    ArtifactStoreError,
)

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

log = logging.getLogger(__name__)

#: The columns every captured batch has, whatever the model's inputs.
CAPTURE_COLUMNS = FIXED_COLUMNS
FEEDBACK_COLUMNS = ("request_id", "record", "label", "received_at")
#: The column :func:`join_labels` adds: the label sent for a captured record, ``None`` when none came.
LABEL = "label"


@dataclass(frozen=True)
class SkippedFile:
    """A batch left out of a window, and why."""

    key: str
    """The batch's artifact key (its folder)."""
    reason: str

    def to_dict(self) -> dict[str, str]:
        """A JSON-safe dict (the report's ``files.skipped``)."""
        return {"key": self.key, "reason": self.reason}


@dataclass
class WindowRead:
    """The rows of one window: what was read, and what was skipped."""

    frame: pd.DataFrame
    """The rows received inside the window, in batch order (captures: one row per record)."""
    start: datetime
    end: datetime
    """The window is ``[start, end)``, UTC."""
    files: list[str] = field(default_factory=list)
    """The keys of the batches read."""
    skipped: list[SkippedFile] = field(default_factory=list)

    @property
    def rows(self) -> int:
        """Rows inside the window."""
        return len(self.frame)


def capture_key(pipeline: str, version: str, hour: datetime) -> str:
    """The store prefix holding the captured batches of one served version and one hour (UTC)."""
    return capture_hour_key(pipeline, version, hour.astimezone(UTC).strftime(HOUR_FORMAT))


def feedback_key(pipeline: str, hour: datetime) -> str:
    """The store prefix holding the feedback batches of one hour (UTC)."""
    return feedback_hour_key(pipeline, hour.astimezone(UTC).strftime(HOUR_FORMAT))


def window_hours(start: datetime, end: datetime) -> Iterator[datetime]:
    """The UTC hours that ``[start, end)`` touches, oldest first.

    Raises:
        ValueError: a naive datetime (the store's hours are UTC: a local time would read the wrong folders), or
            ``end`` not after ``start``.
    """
    start, end = _utc(start, "start"), _utc(end, "end")
    if end <= start:
        raise ValueError(f"the window ends ({end.isoformat()}) before it starts ({start.isoformat()})")
    hour = start.replace(minute=0, second=0, microsecond=0)
    while hour < end:
        yield hour
        hour += timedelta(hours=1)


def read_captures(store: ArtifactStore, pipeline: str, versions: Sequence[str], start: datetime,
                  end: datetime) -> WindowRead:
    """Read the captured rows of ``versions`` received in ``[start, end)``.

    Args:
        store: the artifact store the model server writes to.
        pipeline: the pipeline (the deployment's model name).
        versions: the served versions to read (champion and canary); other versions' folders are not read.
        start: the window's start, timezone-aware.
        end: its end (excluded), timezone-aware.

    Returns:
        The rows (the columns of :data:`CAPTURE_COLUMNS` and one per model input; batches of versions with other
        inputs leave the missing columns null), the batches read and those skipped with their reasons.

    Raises:
        ValueError: see :func:`window_hours`.
        ArtifactStoreError: the store itself failed (a listing refused); a single unreadable batch is skipped.
    """
    keys = [(f"{prefix}/{name}", version) for version in dict.fromkeys(versions) for hour in window_hours(start, end)
            for prefix in [capture_key(pipeline, version, hour)] for name in store.children(prefix)]
    return _read(store, keys, CAPTURE_FILE, CAPTURE_COLUMNS, start, end)


def read_feedback(store: ArtifactStore, pipeline: str, start: datetime, end: datetime) -> WindowRead:
    """Read the feedback rows (labels) received in ``[start, end)``.

    A label usually arrives after its request, so a monitor reads feedback over a window that ends later than
    its capture window (up to now).

    Args:
        store: the artifact store the model server writes to.
        pipeline: the pipeline.
        start: the window's start, timezone-aware.
        end: its end (excluded), timezone-aware.

    Returns:
        The rows (:data:`FEEDBACK_COLUMNS`), the batches read and those skipped with their reasons.

    Raises:
        ValueError: see :func:`window_hours`.
        ArtifactStoreError: the store itself failed.
    """
    keys = [(f"{prefix}/{name}", None) for hour in window_hours(start, end)
            for prefix in [feedback_key(pipeline, hour)] for name in store.children(prefix)]
    return _read(store, keys, FEEDBACK_FILE, FEEDBACK_COLUMNS, start, end)


def join_labels(captured: pd.DataFrame, feedback: pd.DataFrame) -> pd.DataFrame:
    """The captured rows with a :data:`LABEL` column: the label sent for each (request_id, record).

    A record labelled twice keeps its latest label (a correction wins); feedback for records not in
    ``captured`` is left out.

    Args:
        captured: rows of :func:`read_captures`.
        feedback: rows of :func:`read_feedback`.

    Returns:
        A new frame, ``captured``'s rows in their order, the label ``None`` where none came.
    """
    import pandas as pd

    latest = (feedback.sort_values("received_at", kind="stable")
              .drop_duplicates(["request_id", "record"], keep="last")[["request_id", "record", "label"]]
              .astype({"record": "int64"}))
    joined = captured.drop(columns=[LABEL], errors="ignore").astype({"record": "int64"}).merge(
        latest, on=["request_id", "record"], how="left", validate="many_to_one")
    joined[LABEL] = joined[LABEL].astype(object).where(pd.notna(joined[LABEL]), None)
    return joined


def _read(store: ArtifactStore, keys: Sequence[tuple[str, str | None]], filename: str, required: Sequence[str],
          start: datetime, end: datetime) -> WindowRead:
    import pyarrow as pa

    start, end = _utc(start, "start"), _utc(end, "end")
    read = WindowRead(frame=None, start=start, end=end)  # type: ignore[arg-type]  # set below
    tables: list[pa.Table] = []
    for key, version in keys:
        try:
            tables.append(_read_batch(store, key, filename, required, version, start, end))
        except _SkipError as exc:
            log.warning("skipped the batch %s: %s", key, exc)
            read.skipped.append(SkippedFile(key, str(exc)))
            continue
        read.files.append(key)
    if tables:
        frame = pa.concat_tables(tables, promote_options="permissive").to_pandas()
    else:
        import pandas as pd

        frame = pd.DataFrame({name: pd.Series(dtype=object) for name in required})
    read.frame = frame
    log.info("read %d rows from %d batches (%d skipped) for %s to %s", len(frame), len(read.files),
             len(read.skipped), start.isoformat(), end.isoformat())
    return read


class _SkipError(Exception):
    """A batch that cannot be used; the message says why."""


def _read_batch(store: ArtifactStore, key: str, filename: str, required: Sequence[str], version: str | None,
                start: datetime, end: datetime) -> pa.Table:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        path = store.path(key) / filename
        table = pq.read_table(path)
    except ArtifactNotFoundError as exc:
        raise _SkipError(f"not published (a write in progress or one that failed): {exc}") from exc
    except ArtifactStoreError as exc:
        raise _SkipError(f"unreadable from the store: {exc}") from exc
    except FileNotFoundError as exc:
        raise _SkipError(f"no {filename} in the batch") from exc
    except (pa.ArrowException, OSError) as exc:
        raise _SkipError(f"corrupt {filename}: {exc}") from exc
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise _SkipError(f"{filename} lacks the columns {', '.join(missing)}")
    if version is not None:
        found = sorted(v for v in pc.unique(table["version"]).to_pylist() if v != version)
        if found:
            raise _SkipError(f"its version column holds {', '.join(map(repr, found))}, its folder says {version!r}")
    try:
        received = pc.cast(table["received_at"], pa.timestamp("us", "UTC"))
    except (pa.ArrowException, TypeError) as exc:
        raise _SkipError(f"received_at is {table.schema.field('received_at').type}, not a timestamp") from exc
    inside = pc.and_(pc.greater_equal(received, pa.scalar(start, pa.timestamp("us", "UTC"))),
                     pc.less(received, pa.scalar(end, pa.timestamp("us", "UTC"))))
    return table.set_column(table.column_names.index("received_at"), "received_at", received).filter(inside)


def _utc(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"the window's {name} {moment.isoformat()} has no timezone: pass an aware datetime (UTC)")
    return moment.astimezone(UTC)
