"""Artifact store: run-keyed step outputs, published atomically.

Every step writes into a fresh temporary folder handed out by :meth:`ArtifactStore.writer`; only when the step
returns without error is that folder published under its key, replacing an earlier version atomically (an exchange
rename locally, see :mod:`kiln.tasks.storage.publish`; a manifest in S3). A step that fails, or is killed at any
point, leaves the previously published output readable. Nothing reads "latest": callers pass keys.

The embedded default is :class:`LocalArtifactStore` (a directory); ``kiln.tasks.storage.s3.S3ArtifactStore`` keeps
artifacts in an S3 bucket behind the same interface. :func:`store_for_root` picks one from ``KILN_ARTIFACT_ROOT``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from kiln.tasks.storage import publish


class ArtifactNotFoundError(FileNotFoundError):
    """A key was read that no step has published."""


class ArtifactStoreError(RuntimeError):
    """The store itself failed: a missing bucket, denied access, rejected credentials, an unreachable endpoint,
    or published bytes that no longer match their recorded sha256. The message names the place and the fix."""


def key_parts(key: str) -> list[str]:
    """The ``/``-separated names of an artifact key.

    Raises:
        ValueError: the key is empty or holds ``.``, ``..`` or ``.v`` (where the S3 store keeps versions).
    """
    parts = [p for p in key.split("/") if p]
    if not parts or any(p in (".", "..", ".v") for p in parts):
        raise ValueError(f"invalid artifact key {key!r}: use '/'-separated names without '.', '..' or '.v'")
    return parts


def store_for_root(root: str | Path) -> ArtifactStore:
    """The artifact store that ``root`` (the value of ``KILN_ARTIFACT_ROOT``) names.

    Args:
        root: a local folder, or ``s3://bucket/prefix`` for an S3 (or S3-compatible, see ``KILN_S3_ENDPOINT_URL``)
            bucket whose downloads are cached under ``$KILN_HOME/cache/s3``.

    Returns:
        A :class:`LocalArtifactStore` for a path, an ``S3ArtifactStore`` for an ``s3://`` URI.

    Raises:
        ValueError: ``root`` is a URI of another scheme, or an ``s3://`` URI without a bucket.
    """
    text = str(root)
    if "://" not in text:
        return LocalArtifactStore(text)
    if not text.startswith("s3://"):
        raise ValueError(f"KILN_ARTIFACT_ROOT={text!r} is not supported: use a local folder or s3://bucket/prefix")
    from kiln.tasks.settings import get_settings
    from kiln.tasks.storage.s3 import S3ArtifactStore  # boto3 is imported only when an S3 root is configured

    settings = get_settings()
    return S3ArtifactStore(text, cache_dir=settings.home / "cache" / "s3", endpoint_url=settings.s3_endpoint_url)


def run_key(pipeline: str, run_id: str) -> str:
    """The store prefix of one pipeline run. Airflow run ids hold ``:`` and ``+``; keys keep ``[A-Za-z0-9._-]``."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("._") or "run"
    return f"{pipeline}/{slug}"


class ArtifactStore(ABC):
    """Where step outputs live. Keys are ``/``-separated, e.g. ``penguins/manual_2026-11-22/ingest``."""

    #: Whether :meth:`scratch` folders are part of the store (every machine that uses the store sees them). When
    #: not, work that must outlive this machine (training checkpoints) is published through :meth:`writer` too.
    durable_scratch: bool = True

    @abstractmethod
    def writer(self, key: str) -> AbstractContextManager[Path]:
        """Context manager: yields an empty local folder; publishes it under ``key`` on a clean exit."""

    @abstractmethod
    def path(self, key: str) -> Path:
        """A local folder holding the published contents of ``key``.

        Raises:
            ArtifactNotFoundError: nothing is published under ``key``.
        """

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` has been published."""

    @abstractmethod
    def uri(self, key: str) -> str:
        """A URI naming ``key`` for people and logs."""

    @abstractmethod
    def children(self, key: str) -> list[str]:
        """The names directly under ``key`` (published keys or folders of them), sorted; none when there is
        nothing under it. Names starting with ``.`` (writers' temporary and version folders) are left out.

        Raises:
            ArtifactStoreError: the store refused the listing.
        """

    @abstractmethod
    def scratch(self, key: str) -> Path:
        """A persistent local working folder (e.g. checkpoints) that survives task retries on this machine, and
        on every machine when :attr:`durable_scratch` is true."""


class LocalArtifactStore(ArtifactStore):
    """Artifacts in a local directory tree: key ``a/b`` is the folder ``<root>/a/b``, replaced atomically and never
    missing once published, even when its writer is killed (:mod:`kiln.tasks.storage.publish`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def _final(self, key: str) -> Path:
        return self.root.joinpath(*key_parts(key))

    @contextmanager
    def writer(self, key: str) -> Iterator[Path]:
        final = self._final(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        publish.sweep(final)  # what killed writers of this key left
        with publish.staging_folder(final) as tmp:
            try:
                yield tmp
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            publish.publish(tmp, final)

    def path(self, key: str) -> Path:
        final = self._final(key)
        if not publish.recover(final):
            raise ArtifactNotFoundError(f"no artifact published under {self.uri(key)}")
        return final

    def exists(self, key: str) -> bool:
        return publish.recover(self._final(key))

    def uri(self, key: str) -> str:
        return self._final(key).as_uri()

    def children(self, key: str) -> list[str]:
        folder = self._final(key)
        if not folder.is_dir():
            return []
        return sorted(e.name for e in folder.iterdir() if e.is_dir() and not e.name.startswith("."))

    def scratch(self, key: str) -> Path:
        path = self._final(key)
        path.mkdir(parents=True, exist_ok=True)
        return path


class UnavailableStore(ArtifactStore):
    """A store that could not be opened (e.g. S3 without its secret): nothing is found under any key, and every
    write fails naming why. For a process whose main work does not need the store (the model server, whose
    captures are its only writes) and must not die of it."""

    durable_scratch = False

    def __init__(self, root: str, reason: str):
        self.root, self.reason = root, reason

    def _error(self, key: str) -> ArtifactStoreError:
        return ArtifactStoreError(f"the artifact store {self.root} could not be opened ({self.reason}); "
                                  f"nothing can be written under {key}")

    def writer(self, key: str) -> AbstractContextManager[Path]:
        raise self._error(key)

    def path(self, key: str) -> Path:
        raise ArtifactNotFoundError(f"{key}: the artifact store {self.root} could not be opened ({self.reason})")

    def exists(self, key: str) -> bool:
        return False

    def uri(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}"

    def children(self, key: str) -> list[str]:
        return []

    def scratch(self, key: str) -> Path:
        raise self._error(key)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary name in the same folder, then rename. Readers see the old
    bytes or the new ones; the temporary files of writers killed earlier are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    publish.sweep_files(path)
    with publish.temp_file(path) as (tmp, fd):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.replace(tmp, path)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON, keeping key order (column order matters to readers)."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())
