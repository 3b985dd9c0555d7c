"""Where a ``source.uri`` may point: one implementation, used when a spec is loaded (refuse early, naming the
field) and again by ``ingest`` before it opens anything (defence in depth: a spec checked elsewhere, or a file
swapped for a symlink since).

* A path or ``file://`` URI must lie inside a data root once normalised and with every symlink resolved. The roots
  are the spec file's folder, kiln's data folder (``$KILN_HOME/data``) and the folders of ``KILN_DATA_ROOTS``.
* ``pkg://<package>/<resource path>`` names a file inside a package installed in site-packages. The package is
  located with ``importlib.util.find_spec`` on its top-level name, which imports nothing; the resource path may
  not leave the package's folder (no ``..`` segments, and the resolved file must stay inside it).
"""

from __future__ import annotations

import importlib.util
import re
import site
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

URI_FORMS = ("a path (relative to the spec file), a file:// URI, s3://bucket/key-or-prefix, or "
             "pkg://<package>/<resource path>")
_PKG_FORM = "pkg://<package>/<resource path>, e.g. pkg://palmerpenguins/data/penguins.csv"
_PACKAGE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class SourceError(ValueError):
    """``source.uri`` names something kiln may not read; the message says why and what to do instead."""


def data_roots(spec_dir: str | Path | None) -> tuple[Path, ...]:
    """The folders file sources may be read from: ``spec_dir`` (if known), then the configured roots."""
    from kiln.tasks.settings import get_settings

    roots = [Path(spec_dir).resolve()] if spec_dir else []
    return tuple(dict.fromkeys([*roots, *get_settings().data_roots]))


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def is_s3_uri(uri: str) -> bool:
    """Whether ``uri`` names an S3 object or prefix (``s3://...``)."""
    return uri.startswith("s3://")


def s3_parts(uri: str) -> tuple[str, str]:
    """The bucket and key (or prefix; empty for a whole bucket) of an ``s3://`` URI (no I/O).

    Raises:
        SourceError: no valid bucket name, or ``.``/``..`` segments in the key.
    """
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise SourceError(f"{uri!r}: '{bucket}' is not an S3 bucket name (3-63 lowercase letters, digits, '.', '-'); "
                          "write s3://bucket/key for one object or s3://bucket/prefix/ for a prefix of partitions")
    if any(part in (".", "..") for part in key.split("/")):
        raise SourceError(f"{uri!r}: '.' and '..' are not allowed in an S3 key; write the key as stored")
    return bucket, key


def is_package_uri(uri: str) -> bool:
    """Whether ``uri`` names package data (``pkg://...``)."""
    return uri.startswith("pkg://")


def package_parts(uri: str) -> tuple[str, tuple[str, ...]]:
    """The top-level package name and the resource path's segments of a ``pkg://`` URI (no I/O).

    Raises:
        SourceError: not of the form ``pkg://<package>/<resource path>`` with a top-level package name and plain
            segments (no empty, ``.`` or ``..`` segment, no backslash).
    """
    package, _, resource = uri.removeprefix("pkg://").partition("/")
    segments = tuple(resource.split("/")) if resource else ()
    if not _PACKAGE_NAME.fullmatch(package):
        raise SourceError(f"{uri!r}: '{package}' is not a top-level package name (letters, digits, _; no dots); "
                          f"write {_PKG_FORM}")
    if not segments or any(s in ("", ".", "..") or "\\" in s for s in segments):
        raise SourceError(f"{uri!r}: the resource path must be plain folder and file names inside the package "
                          f"(no '..', '.', empty or absolute parts); write {_PKG_FORM}")
    return package, segments


def file_path(uri: str) -> Path:
    """The absolute, normalised path (symlinks resolved) that a path or ``file://`` URI names (no roots check).

    Raises:
        SourceError: an unsupported scheme, a remote ``file://`` host, or a relative path.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise SourceError(f"{uri!r}: file:// URIs must name a local file (file:///abs/path)")
        raw = Path(unquote(parsed.path))
    elif "://" in uri:
        raise SourceError(f"{uri!r}: unsupported scheme '{parsed.scheme}'; use {URI_FORMS}")
    else:
        raw = Path(uri).expanduser()
    if not raw.is_absolute():
        raise SourceError(f"{uri!r}: a relative path is resolved against the spec file's folder when the spec is "
                          "loaded; here it has no folder to be relative to: give an absolute path")
    return raw.resolve()


def check_file_in_roots(uri: str, roots: Sequence[Path]) -> Path:
    """The resolved path of the file source ``uri``, checked to lie inside one of ``roots``.

    Raises:
        SourceError: the URI is malformed, or the path (after ``..`` and symlinks) leaves every root.
    """
    path = file_path(uri)
    resolved_roots = [Path(r).resolve() for r in roots]
    if not any(path.is_relative_to(r) for r in resolved_roots):
        listed = ", ".join(str(r) for r in resolved_roots) or "none"
        raise SourceError(f"{uri!r} resolves to {path}, which is outside the data roots ({listed}); put the file "
                          "under one of them (next to the spec, or in $KILN_HOME/data) or add its folder to "
                          "KILN_DATA_ROOTS")
    return path


def package_file(uri: str) -> Path:
    """The file a ``pkg://`` URI names inside an installed package, found without importing anything.

    Raises:
        SourceError: a malformed URI, a package that is not installed in site-packages (the standard library and
            the working directory are not data sources), a single-module distribution, a missing resource, or a
            resource that resolves outside the package's folder.
    """
    package, segments = package_parts(uri)
    # A top-level name: find_spec consults the import system's finders only, without executing the package.
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise SourceError(f"{uri!r}: no installed Python package '{package}'; install it or fix the package name")
    locations = list(spec.submodule_search_locations or [])
    if not locations:
        raise SourceError(f"{uri!r}: '{package}' is a single module, not a package with data files; "
                          f"pkg:// reads files inside an installed package: {_PKG_FORM}")
    installed = _site_packages()
    folders = [Path(p).resolve() for p in locations if Path(p).is_dir()]
    folders = [f for f in folders if any(f.is_relative_to(s) for s in installed)]
    if not folders:
        raise SourceError(f"{uri!r}: '{package}' is not a package installed in site-packages (the standard "
                          "library, the working directory and editable checkouts are not data sources); use a path "
                          "under a data root instead")
    for folder in folders:
        path = folder.joinpath(*segments).resolve()
        if not path.is_relative_to(folder):
            raise SourceError(f"{uri!r}: resolves to {path}, outside the package's folder {folder}; "
                              f"write {_PKG_FORM}")
        if path.exists():
            if not path.is_file():
                raise SourceError(f"{uri!r}: '{'/'.join(segments)}' in package '{package}' is a folder, not a file")
            return path
    raise SourceError(f"{uri!r}: package '{package}' has no resource '{'/'.join(segments)}'"
                      f"{_closest(folders[0], segments)}")


def _closest(folder: Path, segments: tuple[str, ...]) -> str:
    """A hint naming the sibling closest to the first missing segment."""
    import difflib

    node = folder
    for part in segments:
        if not (node / part).exists():
            siblings = [p.name for p in node.iterdir()] if node.is_dir() else []
            close = difflib.get_close_matches(part, siblings, n=1)
            return f" ('{part}' not found; did you mean '{close[0]}'?)" if close else f" ('{part}' not found)"
        node = node / part
    return ""


def _site_packages() -> list[Path]:
    """The folders installed distributions live in (this interpreter's and the user's site-packages)."""
    paths = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    paths.update(getattr(site, "getsitepackages", list)())
    user = getattr(site, "getusersitepackages", lambda: None)()
    if user:
        paths.add(user)
    return [Path(p).resolve() for p in paths if p]
