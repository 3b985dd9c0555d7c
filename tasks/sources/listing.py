"""What a source holds right now: its parts (files or objects) with their size and a content tag.

One listing serves ``ingest`` (which parts to read, what the manifest records, which parts are new since the last
accepted snapshot), the step cache (the listing's :meth:`SourceListing.fingerprint` keys ``ingest``) and the source
watcher (a changed fingerprint is new data).

* A local file or ``pkg://`` resource is one part named by its file name.
* A local folder holds one part per partition file (every file below it, recursively, whose name does not start
  with ``.`` or ``_``, such as ``_SUCCESS``, ending in ``.csv``, ``.csv.gz``, ``.parquet`` or ``.pq``; any such
  file when ``source.format`` is set), named by its path relative to the folder and sorted by that name.
* ``s3://bucket/key`` is one object; ``s3://bucket/prefix/`` (or a key with no object but objects under
  ``key/``) is every partition object under the prefix, named relative to it, by the same rules.

A part's ``etag`` is S3's ETag for objects (quotes stripped) and the sha256 of the file's bytes for local files,
so one changed byte changes the listing whatever the file's modification time. The sha256 of an unchanged file
(same inode, size and modification time) is remembered in the process, so a watcher polling a folder does not
hash it again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kiln.tasks.sources.errors import SourceEmptyError, SourceReadError
from kiln.tasks.spec.sources import (
    URI_FORMS,
    SourceError,
    check_file_in_roots,
    data_roots,
    is_package_uri,
    is_s3_uri,
    package_file,
)
from kiln.tasks.storage.artifacts import file_sha256

if TYPE_CHECKING:
    from kiln.tasks.spec import SourceSpec

Format = Literal["csv", "parquet"]
PARTITION_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")

_sha_memo: dict[tuple[str, int, int, int, int], str] = {}


@dataclass(frozen=True)
class SourcePart:
    """One file or object of a source."""

    name: str
    """The file's path relative to the folder (or the object's key relative to the prefix); a single file or
    object: its base name."""
    size: int
    """Bytes."""
    etag: str
    """S3 objects: the ETag (without quotes); local files: the sha256 of the bytes."""

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "size", "etag"}`` (JSON-safe)."""
        return {"name": self.name, "size": self.size, "etag": self.etag}


@dataclass(frozen=True)
class SourceListing:
    """The parts of a file, folder, S3 object or S3 prefix source, sorted by name."""

    uri: str
    """The source's URI as the spec gives it."""
    parts: tuple[SourcePart, ...]
    root: str = ""
    """Where the part names are relative to: a local folder's absolute path, or ``s3://bucket/prefix/``."""

    def fingerprint(self) -> str:
        """The sha256 over the name, size and etag of every part: any added, removed or changed part changes it."""
        rows = [[p.name, p.size, p.etag] for p in self.parts]
        return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()

    def location(self, part: SourcePart) -> str:
        """Where ``part`` is read from: a local path or an ``s3://`` URI."""
        if is_s3_uri(self.root):
            return f"{self.root}{part.name}"
        return str(Path(self.root) / part.name)

    def part(self, name: str) -> SourcePart | None:
        """The part called ``name``, or ``None``."""
        return next((p for p in self.parts if p.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (manifests, trigger events); :meth:`from_dict` reads it back."""
        return {"uri": self.uri, "root": self.root, "parts": [p.to_dict() for p in self.parts]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceListing:
        """The listing :meth:`to_dict` wrote (``root`` may be missing: names are then only compared)."""
        parts = tuple(SourcePart(name=str(p["name"]), size=int(p["size"]), etag=str(p["etag"]))
                      for p in d.get("parts", []))
        return cls(uri=str(d["uri"]), parts=tuple(sorted(parts, key=lambda p: p.name)), root=str(d.get("root", "")))


def partition_format(name: str, source: SourceSpec) -> Format | None:
    """The format of the partition file ``name`` (a relative path) inside a folder or prefix, or ``None`` when it is
    not a partition (hidden or marker files, other extensions)."""
    if any(seg.startswith((".", "_")) for seg in name.split("/")):
        return None
    if source.format:
        return source.format
    lower = name.lower()
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    if lower.endswith((".csv", ".csv.gz")):
        return "csv"
    return None


def list_source(source: SourceSpec, roots: tuple[Path, ...] | None = None) -> SourceListing:
    """List the parts of a file, folder, ``pkg://`` or ``s3://`` source.

    Args:
        source: the spec's ``source`` (``uri`` set; a SQL source has no listing).
        roots: the folders a local source may lie in (``None``: the configured data roots).

    Returns:
        The parts, sorted by name.

    Raises:
        SourceReadError: a SQL source; a URI outside the data roots or malformed; no such file, folder, package
            resource, bucket, object or prefix; no partition file; access denied or no credentials (S3).
    """
    if source.uri is None:
        raise SourceReadError(f"source.sql (connection '{source.sql.conn_id if source.sql else '?'}') has no "
                              "listing of files: a SQL source is read by its query")
    uri = source.uri
    if is_s3_uri(uri):
        from kiln.tasks.sources.s3 import list_s3

        return list_s3(uri, source)
    try:
        path = package_file(uri) if is_package_uri(uri) else check_file_in_roots(
            uri, data_roots(None) if roots is None else roots)
    except SourceError as exc:
        raise SourceReadError(f"source.uri {exc}") from None
    if path.is_file():
        return SourceListing(uri=uri, parts=(_local_part(path, path.name),), root=str(path.parent))
    if path.is_dir():
        return _list_folder(uri, path, source, roots)
    raise SourceReadError(f"source file {path} does not exist (source.uri {uri!r}); source.uri should point to an "
                          f"existing file or folder of partition files: {URI_FORMS}")


def _list_folder(uri: str, folder: Path, source: SourceSpec, roots: tuple[Path, ...] | None) -> SourceListing:
    parts = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if not path.is_file() or partition_format(name, source) is None:
            continue
        try:  # a symlink inside the folder may point elsewhere: every partition stays inside the roots
            check_file_in_roots(str(path), data_roots(None) if roots is None else roots)
        except SourceError as exc:
            raise SourceReadError(f"partition {name} of source.uri {uri!r}: {exc}") from None
        parts.append(_local_part(path, name))
    if not parts:
        raise SourceEmptyError(f"folder {folder} (source.uri {uri!r}) holds no partition file (*.csv, *.csv.gz, "
                              "*.parquet; names starting with '.' or '_' are skipped); put the data files there, "
                              "or set source.format to read files with other extensions")
    parts.sort(key=lambda p: p.name)
    return SourceListing(uri=uri, parts=tuple(parts), root=str(folder))


def _local_part(path: Path, name: str) -> SourcePart:
    st = path.stat()
    # ctime too: a same-size rewrite whose mtime was set back still changes it.
    memo_key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _sha_memo.get(memo_key)
    if digest is None:
        digest = file_sha256(path)
        if len(_sha_memo) > 100_000:
            _sha_memo.clear()
        _sha_memo[memo_key] = digest
    return SourcePart(name=name, size=st.st_size, etag=digest)


def local_path(listing: SourceListing, part: SourcePart) -> Path:
    """The local file of ``part`` (a file or folder source)."""
    return Path(listing.root) / part.name


__all__ = ["PARTITION_SUFFIXES", "SourceListing", "SourcePart", "list_source", "local_path", "partition_format"]
