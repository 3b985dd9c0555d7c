"""The kiln token of the model server (every scope on every pipeline): where it comes from. The per-request check,
and the scoped tokens, are :mod:`kiln.tasks.serving.tokens`.

The token is ``KILN_SERVE_TOKEN`` when set; otherwise one random token is generated once into
``$KILN_SERVING_DIR/token`` (mode 0600) and reused by every server and client on this machine.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import time
from pathlib import Path

from kiln.tasks.settings import Settings

log = logging.getLogger(__name__)

#: File name of the generated token inside ``Settings.serving_dir``.
TOKEN_FILE = "token"


def token_path(settings: Settings) -> Path:
    """Where the generated token is kept: ``<serving_dir>/token``."""
    return settings.serving_dir / TOKEN_FILE


def resolve_token(settings: Settings) -> str:
    """The bearer token of the model server's predict and admin endpoints.

    Args:
        settings: ``serve_token`` (``KILN_SERVE_TOKEN``) wins; else the token file under ``serving_dir`` is read,
            or created with a new random token (mode 0600) if it does not exist.

    Returns:
        The token (never logged).

    Raises:
        ValueError: the token file exists but is empty.
    """
    if settings.serve_token:
        return settings.serve_token
    path = token_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: of two processes creating the file at once, one writes it and the other reads it below.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise
    else:
        token = secrets.token_urlsafe(32)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        log.info("generated a new serving token in %s (mode 0600)", path)
        return token
    token = _read_token(path)
    if not token:
        raise ValueError(f"the token file {path} is empty; delete it to generate a new token or set "
                         "KILN_SERVE_TOKEN")
    return token


def _read_token(path: Path, timeout_s: float = 1.0) -> str:
    # A file created a moment ago by another process may still be empty: its writer is about to fill it.
    deadline = time.monotonic() + timeout_s
    while True:
        token = path.read_text().strip()
        if token or time.monotonic() >= deadline:
            return token
        time.sleep(0.01)
