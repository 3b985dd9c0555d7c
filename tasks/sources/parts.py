"""Read the listed parts of a file, folder or S3 source as one stream of record batches of one schema.

S3 parts are downloaded first (each checked against the ETag its listing saw) into a scratch folder, so both CSV
passes read the same bytes and the manifest can record each part's sha256.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from kiln.tasks.sources.errors import IngestError
from kiln.tasks.sources.files import (
    LocalPart,
    csv_batches,
    csv_names,
    guess_csv_schema,
    infer_csv_schema,
    parquet_batches,
    parquet_schema,
    unify,
)
from kiln.tasks.sources.listing import SourceListing, SourcePart, partition_format
from kiln.tasks.spec.sources import is_s3_uri
from kiln.tasks.storage.artifacts import file_sha256

if TYPE_CHECKING:
    from kiln.tasks.spec import SourceSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartsReader:
    """The parts to read, their common schema, and what the manifest records of each."""

    parts: tuple[LocalPart, ...]
    schema: pa.Schema
    records: tuple[dict[str, Any], ...]
    """Per part: ``name``, ``etag``, ``size``, ``sha256`` (of the bytes read)."""
    header: bool
    csv_columns: tuple[str, ...]
    guessed: bool
    """The CSV types are guessed from the first block (:meth:`batches` may raise :class:`TypeGuessError`)."""

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Every part's rows in order, as batches of :attr:`schema`.

        Raises:
            TypeGuessError: a CSV value does not fit the guessed types (read again from :meth:`exact`).
            IngestError: a part cannot be read.
        """
        for part in self.parts:
            log.info("reading %s (%s)", part.label, part.format)
            if part.format == "csv":
                yield from csv_batches(part, list(self.csv_columns), self.header, self.schema, self.guessed)
            else:
                yield from parquet_batches(part, self.schema)
            part.check_unchanged()

    def exact(self) -> PartsReader:
        """This reader with the CSV types settled from every value of every CSV part (a first full pass)."""
        csv_parts = [p for p in self.parts if p.format == "csv"]
        csv_schema = infer_csv_schema(csv_parts, list(self.csv_columns), self.header)
        return replace(self, schema=_unify(self.parts, csv_schema), guessed=False)


def open_parts(listing: SourceListing, parts: Sequence[SourcePart], source: SourceSpec,
               scratch: Path) -> PartsReader:
    """Localise ``parts`` (downloading S3 objects into ``scratch``) and settle their common schema.

    Raises:
        IngestError: options that do not fit the format, unreadable or empty parts, duplicate column names,
            partitions whose columns or types differ (naming the partition and the columns), or an S3 object
            that changed since it was listed.
    """
    single = len(listing.parts) == 1 and listing.uri.rstrip("/").endswith(listing.parts[0].name)
    local = []
    records = []
    for i, part in enumerate(parts):
        fmt = source.resolved_format(part.name) if single else partition_format(part.name, source)
        path = _localise(listing, part, scratch, i)
        label = source.uri if single and source.uri else listing.location(part)
        st = path.stat()
        if st.st_size != part.size:
            raise IngestError(f"{listing.location(part)} has {st.st_size} bytes, its listing {part.size}: it changed "
                              "since it was listed; run the pipeline again once it is written in full")
        local.append(LocalPart(path=path, label=str(label), format=fmt or "csv", stamp=(st.st_size, st.st_mtime_ns)))
        sha = part.etag if not is_s3_uri(listing.root) else file_sha256(path)
        records.append({**part.to_dict(), "sha256": sha})
    _check_options(source, local)
    csv_parts = [p for p in local if p.format == "csv"]
    names: list[str] = []
    csv_schema = None
    if csv_parts:
        names = csv_names(csv_parts[0], source.header, source.column_names)
        for part in csv_parts[1:]:
            other = csv_names(part, source.header, source.column_names)
            if other != names:
                unify([(csv_parts[0].label, _names_schema(names)), (part.label, _names_schema(other))])
                raise IngestError(f"partition {part.label} has its columns in another order than "
                                  f"{csv_parts[0].label}; every CSV partition must have the same header")
        csv_schema = guess_csv_schema(csv_parts[0], names, source.header)
    return PartsReader(parts=tuple(local), schema=_unify(local, csv_schema), records=tuple(records),
                       header=source.header, csv_columns=tuple(names), guessed=csv_schema is not None)


def _unify(parts: Sequence[LocalPart], csv_schema: pa.Schema | None) -> pa.Schema:
    """One schema for the CSV parts (``csv_schema``) and each Parquet part."""
    schemas = [(next(p.label for p in parts if p.format == "csv"), csv_schema)] if csv_schema is not None else []
    schemas += [(p.label, parquet_schema(p)) for p in parts if p.format == "parquet"]
    return unify(schemas)


def _names_schema(names: list[str]) -> pa.Schema:
    return pa.schema([pa.field(n, pa.null()) for n in names])


def _localise(listing: SourceListing, part: SourcePart, scratch: Path, index: int) -> Path:
    if not is_s3_uri(listing.root):
        return Path(listing.root) / part.name
    from kiln.tasks.sources.s3 import download

    target = scratch / f"{index:06d}-{part.name.rsplit('/', 1)[-1]}"  # keeps .csv.gz: read decompressed
    download(listing, part, target)
    return target


def _check_options(source: SourceSpec, parts: Sequence[LocalPart]) -> None:
    label = source.uri
    if any(p.format == "parquet" for p in parts) and (not source.header or source.column_names is not None):
        raise IngestError(f"source {label}: source.header and source.column_names apply to CSV only; remove them "
                          "or set source.format: csv")
    if source.header and source.column_names is not None:
        raise IngestError(f"source {label}: source.column_names is only used with header: false (the file's header "
                          "names the columns); remove column_names or set header: false")
