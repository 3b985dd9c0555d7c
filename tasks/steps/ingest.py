"""The ``ingest`` step: read the source named by the spec and freeze it as a Parquet snapshot plus a manifest.

Every later step reads the snapshot, never the source, so a run is reproducible even if the source changes: the
manifest records the sha256 of the raw source bytes and of the snapshot. A run takes its snapshot once: a retried
``ingest`` of the same run returns the snapshot already taken.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.tasks.errors import DataError
from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.spec import PipelineSpec, SourceSpec
from kiln.tasks.spec.sources import (
    URI_FORMS,
    SourceError,
    check_file_in_roots,
    data_roots,
    is_package_uri,
    package_file,
)
from kiln.tasks.storage.artifacts import file_sha256, read_json, write_json

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

class IngestError(DataError):
    """The source cannot be read into a usable table (missing, unparseable, empty, duplicate column names)."""


@dataclass(frozen=True)
class IngestConfig:
    """Settings of the ``ingest`` step."""

    source: SourceSpec
    """Where the raw data comes from and how to parse it."""
    sample_fraction: float = 1.0
    """Fraction of rows kept, in ``(0, 1]``; the sample is seeded and keeps the source's row order."""
    seed: int = 42
    """Random seed of the sample."""
    data_roots: tuple[Path, ...] | None = None
    """The folders a file source may be read from; ``None``: the configured ones (``$KILN_HOME/data`` and
    ``KILN_DATA_ROOTS``) only. ``pkg://`` sources need no root."""

    def __post_init__(self) -> None:
        if not 0 < self.sample_fraction <= 1:
            raise ValueError(f"IngestConfig.sample_fraction must be in (0, 1], got {self.sample_fraction}")

    @classmethod
    def from_spec(cls, spec: PipelineSpec, spec_dir: str | Path | None = None) -> IngestConfig:
        """The config a pipeline spec implies (the sample is seeded by ``training.seed``); file sources may be
        read from ``spec_dir`` (the spec file's folder) and the configured data roots."""
        return cls(source=spec.source, sample_fraction=spec.sample_fraction, seed=spec.training.seed,
                   data_roots=data_roots(spec_dir))


@dataclass(frozen=True)
class IngestResult:
    """What ``ingest`` wrote: the snapshot's shape and fingerprints."""

    rows: int
    columns: dict[str, str]
    """Column name to pandas dtype name, in column order."""
    sha256: str
    """sha256 of ``snapshot.parquet``."""
    source_uri: str
    source_sha256: str
    """sha256 of the raw source file's bytes."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the step's XCom value)."""
        return asdict(self)


def run_ingest(config: IngestConfig, out_dir: Path) -> IngestResult:
    """Read the source and write ``snapshot.parquet`` and ``manifest.json`` into ``out_dir``.

    Args:
        config: the source and sampling settings.
        out_dir: an empty folder that the caller publishes once this returns.

    Returns:
        The snapshot's row count, column dtypes and sha256 digests.

    Raises:
        IngestError: the source is missing, unreadable, not in the declared format, empty (also after
            sampling), or has duplicate column names.
    """
    source = config.source
    path = _source_file(source.uri, data_roots(None) if config.data_roots is None else config.data_roots)
    source_sha256 = file_sha256(path)
    df = _read(path, source)
    log.info("read %s: %d rows, %d columns", source.uri, len(df), len(df.columns))
    if df.empty:
        raise IngestError(f"source {source.uri} has no data rows ({len(df.columns)} columns, 0 rows); "
                          "point source.uri at a file with data")
    if config.sample_fraction < 1:
        rows_in = len(df)
        df = df.sample(frac=config.sample_fraction, random_state=config.seed).sort_index()
        log.info("sample fraction %.4g seed %d: rows in %d out %d dropped %d", config.sample_fraction,
                 config.seed, rows_in, len(df), rows_in - len(df))
        if df.empty:
            raise IngestError(f"sample_fraction {config.sample_fraction} of {rows_in} rows in {source.uri} "
                              "leaves 0 rows; raise sample_fraction")
    df = df.reset_index(drop=True)

    out_dir = Path(out_dir)
    snapshot = out_dir / keys.SNAPSHOT_FILE
    df.to_parquet(snapshot, engine="pyarrow", index=False)
    columns = {str(c): str(t) for c, t in df.dtypes.items()}
    result = IngestResult(rows=len(df), columns=columns, sha256=file_sha256(snapshot), source_uri=source.uri,
                          source_sha256=source_sha256)
    write_json(out_dir / keys.SNAPSHOT_MANIFEST_FILE, {
        "source_uri": source.uri,
        "source_sha256": source_sha256,
        "rows": result.rows,
        "columns": columns,
        "sha256": result.sha256,
        "sample_fraction": config.sample_fraction,
        "seed": config.seed,
        "created_at": datetime.now(UTC).isoformat(),
    })
    log.info("wrote %s: %d rows, %d columns, sha256 %s", snapshot, result.rows, len(columns), result.sha256[:12])
    return result


def ingest(ctx: RunContext) -> IngestResult:
    """Snapshot the source into ``<run>/ingest``, once per run.

    The snapshot is immutable: a retried or re-run ``ingest`` of the same run returns the snapshot already taken
    instead of re-reading a source that may have changed since, so every later step of the run sees the same rows.
    """
    key = ctx.key(keys.INGEST)
    if ctx.store.exists(key):
        manifest = read_json(ctx.input_dir(keys.INGEST) / keys.SNAPSHOT_MANIFEST_FILE)
        log.info("snapshot for %s already taken (%d rows, sha256 %s); reusing it", ctx.run_key, manifest["rows"],
                 manifest["sha256"][:12])
        return IngestResult(**{k: v for k, v in manifest.items() if k in IngestResult.__dataclass_fields__})
    config = IngestConfig.from_spec(ctx.spec, Path(ctx.spec_path).parent if ctx.spec_path else None)
    result = ctx.publish(keys.INGEST, lambda out: run_ingest(config, out))
    (ctx.input_dir(keys.INGEST) / keys.SNAPSHOT_FILE).chmod(0o444)
    return result


def _source_file(uri: str, roots: tuple[Path, ...]) -> Path:
    """The local file ``uri`` names, checked again here (``kiln.tasks.spec.sources``): inside a data root, or
    inside an installed package (found without importing it)."""
    try:
        path = package_file(uri) if is_package_uri(uri) else check_file_in_roots(uri, roots)
    except SourceError as exc:
        raise IngestError(f"source.uri {exc}") from None
    if not path.is_file():
        raise IngestError(f"source file {path} does not exist (source.uri {uri!r}); source.uri should point to "
                          f"an existing file: {URI_FORMS}")
    return path


def _read(path: Path, source: SourceSpec) -> pd.DataFrame:
    """Parse ``path`` as the source's format; every parse failure becomes an :class:`IngestError`."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    fmt = source.resolved_format()
    if fmt == "parquet" and (not source.header or source.column_names is not None):
        raise IngestError(f"source {source.uri}: source.header and source.column_names apply to CSV only; "
                          "remove them or set source.format: csv")
    if source.header and source.column_names is not None:
        raise IngestError(f"source {source.uri}: source.column_names is only used with header: false (the "
                          "file's header names the columns); remove column_names or set header: false")
    try:
        if fmt == "parquet":
            _check_unique(pq.read_schema(path).names, source.uri)
            return pd.read_parquet(path, engine="pyarrow")
        if source.header:
            header = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False)
            _check_unique(list(header.iloc[0]), source.uri)
            return pd.read_csv(path)
        df = pd.read_csv(path, header=None)
    except pd.errors.EmptyDataError:
        raise IngestError(f"source {source.uri} is empty (no columns, no rows); point source.uri at a file "
                          "with data") from None
    except IngestError:
        raise
    except (pa.ArrowException, pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError) as exc:
        raise IngestError(f"cannot read source {source.uri} as {fmt}: {exc}. Check that the file is "
                          f"{fmt} or set source.format to its real format") from None
    if source.column_names is None:
        df.columns = [f"col_{i}" for i in range(len(df.columns))]
        return df
    if len(source.column_names) != len(df.columns):
        raise IngestError(f"source {source.uri}: source.column_names has {len(source.column_names)} names "
                          f"but the file has {len(df.columns)} columns; give exactly one name per column")
    _check_unique(source.column_names, source.uri, where="source.column_names")
    df.columns = list(source.column_names)
    return df


def _check_unique(names: list[Any], uri: str, where: str = "the header") -> None:
    counts = Counter(str(n) for n in names)
    dupes = sorted(name for name, n in counts.items() if n > 1)
    if dupes:
        raise IngestError(f"source {uri}: duplicate column names in {where}: {', '.join(dupes)}; "
                          "rename them so every column name is unique")
