"""Scoped bearer tokens of the model server: who may predict, who may administer (reload, stats), for which pipelines.

Two kinds of token open the server:

* the **kiln token** (``KILN_SERVE_TOKEN`` or the generated ``<serving_dir>/token``, see :mod:`.auth`): every scope
  on every pipeline. kiln's own steps (deploy, verify, infra_validate) use it;
* the **scoped tokens** of the tokens file (``<serving_dir>/tokens.json``, mode 0600), each with a name, its scopes
  (``predict``, ``admin``) and its pipelines (``*``: all). The file holds only each token's SHA-256, never the token;
  ``kiln serve token add`` prints a new token once.

A running server re-reads the tokens file within :data:`POLL_S` of a change (and on ``/admin/reload`` or SIGHUP),
so a token is rotated without downtime: add the new one, move the clients to it, revoke the old one; both are valid
in between. A file that cannot be read or is invalid leaves the server with the tokens it had, and says why in its
log.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from kiln.tasks.serving.deployment import utc_now

log = logging.getLogger(__name__)

Scope = Literal["predict", "admin"]
SCOPES: tuple[Scope, ...] = ("predict", "admin")
#: The pipelines entry that means every pipeline.
ALL_PIPELINES = "*"
#: File name of the scoped tokens inside ``Settings.serving_dir``.
TOKENS_FILE = "tokens.json"
#: Seconds between two checks of the tokens file for a change.
POLL_S = 1.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class TokenFileError(ValueError):
    """The tokens file is not valid; the message names the file and the entry."""


@dataclass(frozen=True)
class Grant:
    """What one token may do."""

    name: str
    scopes: frozenset[str]
    pipelines: frozenset[str]
    """Pipeline (model) names, or ``{"*"}`` for every pipeline."""

    def refusal(self, scope: Scope, pipeline: str | None) -> str | None:
        """Why this token may not use ``scope`` on ``pipeline``; ``None`` when it may."""
        if scope not in self.scopes:
            return (f"the token {self.name!r} has the scope(s) {', '.join(sorted(self.scopes))}, not {scope!r}; "
                    f"use a token with the {scope!r} scope")
        if ALL_PIPELINES not in self.pipelines and pipeline not in self.pipelines:
            return (f"the token {self.name!r} is for the pipeline(s) {', '.join(sorted(self.pipelines))}, not "
                    f"{pipeline!r}")
        return None


#: The grant of the kiln token.
KILN_GRANT = Grant("kiln", frozenset(SCOPES), frozenset({ALL_PIPELINES}))


def digest(token: str | bytes) -> str:
    """The SHA-256 (hex) under which the tokens file knows a token."""
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).hexdigest()


def _entry_grant(entry: Any, where: str) -> tuple[str, Grant]:
    if not isinstance(entry, dict):
        raise TokenFileError(f"{where}: must be an object with name, sha256, scopes and pipelines")
    name, sha, scopes, pipelines = (entry.get(k) for k in ("name", "sha256", "scopes", "pipelines"))
    if not isinstance(name, str) or not _NAME.match(name):
        raise TokenFileError(f"{where}.name: must be 1-64 letters, digits, '_', '.' or '-', found {name!r}")
    if not isinstance(sha, str) or not _SHA256.match(sha):
        raise TokenFileError(f"{where}.sha256: must be the token's SHA-256 in lower-case hex, found {sha!r}")
    if not isinstance(scopes, list) or not scopes or not set(scopes) <= set(SCOPES):
        raise TokenFileError(f"{where}.scopes: must be a non-empty list of {', '.join(SCOPES)}, found {scopes!r}")
    if (not isinstance(pipelines, list) or not pipelines
            or not all(isinstance(p, str) and p for p in pipelines)):
        raise TokenFileError(f"{where}.pipelines: must be a non-empty list of pipeline names or [\"*\"] for all, "
                             f"found {pipelines!r}")
    return sha, Grant(name, frozenset(scopes), frozenset(pipelines))


def parse_tokens(data: bytes, path: Path) -> dict[str, Grant]:
    """The grants of a tokens file's content, by token digest.

    Raises:
        TokenFileError: not JSON, not ``{"tokens": [...]}``, an invalid entry, or a repeated name or digest.
    """
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise TokenFileError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("tokens"), list):
        raise TokenFileError(f'{path}: must be a JSON object {{"tokens": [...]}}')
    grants: dict[str, Grant] = {}
    names: set[str] = set()
    for i, entry in enumerate(doc["tokens"]):
        sha, grant = _entry_grant(entry, f"{path}: tokens[{i}]")
        if grant.name in names or sha in grants:
            raise TokenFileError(f"{path}: tokens[{i}]: the name {grant.name!r} or its token appears twice")
        names.add(grant.name)
        grants[sha] = grant
    return grants


def read_tokens(path: Path) -> dict[str, Grant]:
    """The grants of the tokens file at ``path`` by token digest; ``{}`` when it does not exist.

    Raises:
        TokenFileError: the file is invalid (see :func:`parse_tokens`).
        OSError: the file cannot be read.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return {}
    return parse_tokens(data, Path(path))


@contextmanager
def _locked_entries(path: Path) -> Iterator[list[dict[str, Any]]]:
    """The entries of the tokens file, to change in place; written back atomically (mode 0600) on exit, with the
    file locked meanwhile so that two commands at once do not lose a change."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        read_tokens(path)  # refuse to edit a file that is already invalid: its owner should look first
        entries = orjson.loads(path.read_bytes())["tokens"] if path.exists() else []
        yield entries
        parse_tokens(orjson.dumps({"tokens": entries}), path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(orjson.dumps({"tokens": entries}, option=orjson.OPT_INDENT_2) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        os.close(lock_fd)


def add_token(path: Path, name: str, scopes: list[str], pipelines: list[str]) -> str:
    """Add a scoped token to the tokens file (created if missing, mode 0600).

    Args:
        path: the tokens file (``<serving_dir>/tokens.json``).
        name: a unique name (shown in 403 answers and ``kiln serve token list``; never the token).
        scopes: some of ``predict``, ``admin``.
        pipelines: the pipelines it opens, or ``["*"]`` for all.

    Returns:
        The new token: shown once, kept nowhere (the file holds its SHA-256).

    Raises:
        TokenFileError: an invalid name, scope or pipeline, a name already in the file, or an invalid file.
    """
    if not _NAME.match(name):
        raise TokenFileError(f"the token name must be 1-64 letters, digits, '_', '.' or '-' (starting with a letter "
                             f"or digit), found {name!r}")
    if not scopes or not set(scopes) <= set(SCOPES):
        raise TokenFileError(f"the scopes must be some of {', '.join(SCOPES)}, found {scopes!r}")
    if not pipelines or not all(pipelines):
        raise TokenFileError(f"name at least one pipeline, or '*' for every pipeline, found {pipelines!r}")
    token = secrets.token_urlsafe(32)
    with _locked_entries(path) as entries:
        if any(e.get("name") == name for e in entries):
            raise TokenFileError(f"{path}: a token named {name!r} exists; revoke it first or choose another name")
        entries.append({"name": name, "sha256": digest(token), "scopes": sorted(set(scopes)),
                        "pipelines": sorted(set(pipelines)), "created_at": utc_now()})
    log.info("added the %s token %r for %s to %s", "+".join(sorted(set(scopes))), name, ", ".join(pipelines), path)
    return token


def revoke_token(path: Path, name: str) -> bool:
    """Remove the token named ``name`` from the tokens file; whether it was there."""
    if not Path(path).exists():
        return False
    with _locked_entries(path) as entries:
        kept = [e for e in entries if e.get("name") != name]
        found = len(kept) != len(entries)
        entries[:] = kept
    return found


class TokenCheck:
    """The server's check of a request's ``Authorization`` header against the kiln token and the tokens file.

    Args:
        kiln_token: the token with every right (:func:`kiln.tasks.serving.auth.resolve_token`).
        tokens_file: the scoped tokens (``None``: only the kiln token).

    Raises:
        TokenFileError, OSError: the tokens file exists but is invalid or unreadable.
    """

    def __init__(self, kiln_token: str, tokens_file: Path | None = None):
        if not kiln_token:
            raise ValueError("TokenCheck needs a non-empty kiln token")
        self._kiln = b"Bearer " + kiln_token.encode()
        self.tokens_file = Path(tokens_file) if tokens_file is not None else None
        self._stamp: tuple[int, int, int] | None = None
        self._grants: dict[str, Grant] = {}
        self.refresh(strict=True)

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.tokens_file)  # type: ignore[arg-type]
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def refresh(self, *, strict: bool = False) -> None:
        """Re-read the tokens file if it changed since the last read (cheap when it did not: one ``stat``).

        Args:
            strict: raise on an invalid file (at start) instead of keeping the tokens read before.
        """
        if self.tokens_file is None:
            return
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        try:
            grants = read_tokens(self.tokens_file)
        except (TokenFileError, OSError) as exc:
            if strict:
                raise
            log.error("the tokens file changed but cannot be used; the %d token(s) read before stay valid: %s",
                      len(self._grants), exc)
            self._stamp = stamp  # logged once per change, not once per poll
            return
        self._grants, self._stamp = grants, stamp
        log.info("read %d scoped token(s) from %s", len(grants), self.tokens_file)

    def grant(self, raw_headers: list[tuple[bytes, bytes]]) -> Grant | None:
        """The grant of the request's bearer token; ``None`` without a known one.

        The kiln token is compared in constant time; a scoped token is looked up by its SHA-256, so the time
        taken tells nothing about how much of a guess matched either.
        """
        for name, value in raw_headers:
            if name == b"authorization":  # ASGI servers lower-case header names
                if hmac.compare_digest(value, self._kiln):
                    return KILN_GRANT
                if value[:7] != b"Bearer " or not self._grants:
                    return None
                return self._grants.get(digest(value[7:]))
        return None
