"""Fencing a checkpoint folder: only the newest try of a job may write into it.

Each try of the ``train`` step claims the folder with a token of its own before it starts the job
(:func:`claim`); the job's rank 0 writes a checkpoint or logs an epoch to MLflow only while holding the folder
under its token (:func:`holding`). A job of an earlier try that is still running (an orphan its killed task left
behind) finds another token there, and stops instead of writing: the retry's checkpoints are only its own.

The check and the write happen under a shared ``flock`` of the folder's lock file and the claim under an exclusive
one, so a claim never lands between an orphan's check and its write. ``flock`` works across processes and the
bind mounts of containers on one host.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kiln.tasks.storage.artifacts import atomic_write_bytes

#: The token of the try that owns the folder.
FENCE_FILE = ".fence"
#: The lock file that orders claims against checked writes.
LOCK_FILE = ".fence.lock"
#: The most of a token that is read or written: tokens are short ids.
MAX_TOKEN_CHARS = 200


class StaleFenceError(RuntimeError):
    """The folder was claimed by a newer try of the job: this one must stop writing."""

    def __init__(self, folder: Path, token: str, current: str | None):
        self.folder, self.token, self.current = folder, token, current
        super().__init__(f"checkpoint folder {folder} now belongs to try {current!r}, not to this job's {token!r}: "
                         "a newer try of the task took over (this job outlived its task); stopping without writing")


@contextmanager
def _locked(folder: Path, exclusive: bool) -> Iterator[None]:
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o664)
    except PermissionError:  # a container's user that may not write the file: flock needs only a descriptor
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def current_token(folder: Path) -> str | None:
    """The token of the try that claimed ``folder`` last; ``None`` if none did."""
    try:
        return (Path(folder) / FENCE_FILE).read_text()[:MAX_TOKEN_CHARS]
    except FileNotFoundError:
        return None


def claim(folder: Path, token: str) -> None:
    """Make ``token`` the owner of ``folder`` (created if missing); jobs holding another token stop writing."""
    if not token or len(token) > MAX_TOKEN_CHARS:
        raise ValueError(f"fence token must be 1..{MAX_TOKEN_CHARS} characters, got {len(token)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder, exclusive=True):
        atomic_write_bytes(folder / FENCE_FILE, token.encode())


@contextmanager
def holding(folder: Path, token: str | None) -> Iterator[None]:
    """Hold ``folder`` for ``token`` while the block writes; ``None``: an unfenced job (a test, a notebook).

    Raises:
        StaleFenceError: another try claimed the folder; nothing must be written.
    """
    if token is None:
        yield
        return
    folder = Path(folder)
    with _locked(folder, exclusive=False):
        current = current_token(folder)
        if current != token:
            raise StaleFenceError(folder, token, current)
        yield
