"""The errors of reading a source: each names the object, connection or column and the fix."""

from __future__ import annotations

from kiln.tasks.errors import DataError


class IngestError(DataError):
    """The source cannot be read into a usable table (missing, unparseable, empty, duplicate column names, a
    partition whose schema differs, an unreachable bucket, a failing query)."""


class SourceReadError(IngestError):
    """The source cannot be listed or opened (no such file, bucket or prefix; access denied; no credentials)."""


class SourceEmptyError(SourceReadError):
    """The source's folder or S3 prefix exists but holds no data yet (ingest fails; a watcher waits for it)."""


class SourceUnreachableError(ConnectionError):
    """The source's endpoint or database cannot be reached right now; a retry may succeed."""
