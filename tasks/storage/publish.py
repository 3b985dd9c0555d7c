"""Publishing a finished folder under a name in one atomic step, and cleaning up after writers that were killed.

The local artifact store keeps a key as a plain folder, ``<root>/<key>``, which readers, training containers and
Docker mounts use as it is. A writer fills a temporary sibling, ``.tmp-<name>-<tag>``, then:

- **exchange** (Linux ``renameat2(RENAME_EXCHANGE)``: ext4, xfs, btrfs, tmpfs, overlayfs): the new folder and the
  published one trade names in one system call, so the key names the old contents or the new ones at every instant;
  the old contents, now under the temporary name, are removed afterwards. The first publish of a key, when there is
  nothing to exchange with, is a plain ``rename``, which never replaces a non-empty folder: if another writer
  published in between, the writer exchanges with theirs instead. Two concurrent writers of a key therefore both
  succeed and the key ends as one writer's complete folder.
- **two renames** where the filesystem refuses the exchange (NFS, CIFS, some FUSE filesystems, kernels before 3.15):
  under a per-key lock file, ``.lock-<name>``, the published folder moves aside to ``.old-<name>-<tag>`` and the new
  one takes its name. A writer killed between the two renames leaves the key missing on disk with its contents
  complete under ``.old-``: a reader that finds the key missing, or the next writer, takes the key lock and renames
  the newest ``.old-`` back (:func:`recover`). The key lock is held for those renames and the removal of the old
  contents, never while a step runs.
  This also repairs keys left missing by writers of kiln versions that published with two renames and no lock.

Exchange was chosen over versioned folders behind a symlink (the S3 store's manifest, locally) because the key stays
a real folder: paths already handed to training jobs and containers, ``Path.resolve()`` and bind mounts keep working,
and a version folder's removal can never pull the published contents from under a reader that resolved the link.

Leftovers: a writer holds an ``flock`` on its temporary folder from creation to the end of its publish (the kernel
drops it when the process dies, SIGKILL included, in whatever PID namespace the writer ran). The next writer of the
same key removes every ``.tmp-<name>-*`` it can lock, that is, whose writer is gone, and never one a live writer
holds; it retires stale ``.old-<name>-*`` folders (under the key lock) the same way. Where the filesystem refuses
locks, leftovers are kept: a writer that cannot be proven dead is never touched.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path

log = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
#: errno values with which a kernel or filesystem says it has no RENAME_EXCHANGE (not a failure of this publish).
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
_LEFTOVER = re.compile(r"^\.(?P<kind>tmp|old)-(?P<name>.+)-(?P<tag>[0-9a-f]{8,32})$")

# Test seams (tests/unit/test_publish_kill.py sets them inside a child process; nothing else may):
#: called as ``_test_hook(point, folder)`` at each named point of a publish: "before_publish" (the new folder is
#: complete, nothing renamed), "swapped" (exchanged: the old contents are under the temporary name), "moved_aside"
#: (two renames: the key is missing, its contents under ``.old-``), "renamed" (two renames: the new folder is
#: published, ``.old-`` still there), "cleanup" (the old contents are about to be removed).
_test_hook: Callable[[str, Path], None] | None = None
#: False forces the two-rename publish, as on a filesystem that refuses RENAME_EXCHANGE.
_use_exchange = True


def _point(name: str, folder: Path) -> None:
    if _test_hook is not None:
        _test_hook(name, folder)


def _load_renameat2() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.5
    except (AttributeError, OSError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` atomically; False where the kernel or filesystem cannot.

    Raises:
        FileNotFoundError: ``b`` (or ``a``) does not exist.
        OSError: any other failure, with its errno.
    """
    if _renameat2 is None or not _use_exchange:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def temp_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """A new, empty folder ``parent/<prefix><tag>``, locked by this process until the block ends.

    The lock proves to others that the folder is in use (:func:`remove_abandoned` keeps it). A sweep may lock and
    remove the folder in the instant between its ``mkdir`` and our lock; we notice (the folder has no links left)
    and take a new one.
    """
    while True:
        tmp = parent / f"{prefix}{uuid.uuid4().hex[:16]}"
        tmp.mkdir()  # the umask's mode, not mkdtemp's 0700: training containers run as another user
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue
        try:
            if _lock(fd, blocking=True) and os.fstat(fd).st_nlink == 0:
                continue  # swept before we held it
            yield tmp
            return
        finally:
            os.close(fd)


def staging_folder(final: Path) -> AbstractContextManager[Path]:
    """The locked ``.tmp-<name>-<tag>`` folder beside ``final`` that a writer of ``final`` fills (the name that
    :func:`sweep` looks for)."""
    return temp_folder(final.parent, f".tmp-{final.name}-")


def remove_abandoned(folder: Path) -> bool:
    """Remove ``folder`` (made by :func:`temp_folder`) if no live process holds it; whether it was removed."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        if not _lock(fd, blocking=False):
            return False  # a live writer holds it, or the filesystem cannot say: keep it
        shutil.rmtree(folder, ignore_errors=True)  # still holding the lock: its writer cannot be mid-start
        log.info("removed %s in %s, left by a process that was killed", folder.name, folder.parent)
        return True
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Make the complete folder ``tmp`` the contents of ``final``, replacing what was published there.

    ``final`` names the old contents or the new ones at every instant (see the module docstring for the two-rename
    fallback, where a kill leaves them recoverable under ``.old-``). ``tmp`` no longer exists afterwards.
    """
    _point("before_publish", tmp)
    while True:
        try:
            swapped = _exchange(tmp, final)
        except FileNotFoundError:
            try:
                os.rename(tmp, final)  # nothing published yet; never replaces a non-empty folder
                return
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    continue  # another writer published first: exchange with theirs
                raise
        if swapped:
            _point("swapped", tmp)
            _discard(tmp)  # the old contents, now under our temporary name
            return
        _publish_by_two_renames(tmp, final)
        return


def _publish_by_two_renames(tmp: Path, final: Path) -> None:
    """The fallback where the filesystem refuses RENAME_EXCHANGE: move the published folder aside, then rename the
    new one into place, both under the key lock so that readers and the next writer can tell a killed writer's
    ``.old-`` (key missing, lock free) from a live one's (lock held for microseconds)."""
    moved: list[Path] = []
    with _key_lock(final):
        _settle(final)
        while True:
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:16]}"
            try:
                os.rename(final, old)
                moved.append(old)
                _point("moved_aside", old)
            except FileNotFoundError:
                pass
            try:
                os.rename(tmp, final)
                break
            except OSError as exc:
                # A writer whose exchange found the key missing (we had moved it aside) renamed its folder in
                # without the key lock: move that one aside too.
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        if moved:
            _point("renamed", moved[-1])
        # Still under the key lock: once it is let go, another writer's _settle would take an .old- folder that is
        # still being removed for a stale one and retire it, leaving its rest behind until a later write.
        for old in moved:
            _discard(old)


def recover(final: Path) -> bool:
    """Whether ``final`` is published, after restoring contents that a writer killed between the two renames of
    the fallback publish left under ``.old-``. Cheap when the key is there: one ``stat``."""
    if final.is_dir():
        return True
    _, olds = _leftovers(final)
    if not olds and not (final.parent / f".lock-{final.name}").exists():
        return False  # never published with two renames: nothing can be half-moved
    try:
        with _key_lock(final):  # a live writer between its renames holds it for microseconds
            _settle(final)
    except OSError as exc:  # a read-only mount or another user's folder
        log.warning("cannot restore %s from the .old- folder a killed publish left (%s): make %s writable for this "
                    "user, or publish the key again", final, exc, final.parent)
    return final.is_dir()


def sweep(final: Path) -> None:
    """Remove what killed writers of ``final`` left beside it: temporary folders whose writer no longer holds them,
    and ``.old-`` folders no longer needed (restoring the newest first if the key is missing)."""
    if not final.parent.is_dir():
        return
    tmps, olds = _leftovers(final)
    if olds or (not final.is_dir() and (final.parent / f".lock-{final.name}").exists()):
        with _key_lock(final):
            _settle(final)
        tmps, _ = _leftovers(final)  # _settle retires stale .old- folders as .tmp- ones
    for tmp in tmps:
        remove_abandoned(tmp)


def _settle(final: Path) -> None:
    """Under the key lock: restore the newest ``.old-`` if ``final`` is missing; retire every other ``.old-`` as an
    unlocked ``.tmp-`` folder, which :func:`sweep` removes (renames here keep the key lock short)."""
    _, olds = _leftovers(final)
    if not olds:
        return
    # rename() sets a folder's ctime, so the newest ctime is the folder moved aside last: the last published one.
    olds.sort(key=_ctime)
    if not final.is_dir():
        newest = olds.pop()
        os.rename(newest, final)
        log.warning("restored %s from %s, which a publish killed between its two renames left aside", final,
                    newest.name)
    for stale in olds:
        with suppress(FileNotFoundError):
            os.rename(stale, final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:16]}")


def _ctime(folder: Path) -> tuple[int, str]:
    try:
        return folder.stat().st_ctime_ns, folder.name
    except FileNotFoundError:
        return 0, folder.name


def _leftovers(final: Path) -> tuple[list[Path], list[Path]]:
    """The ``.tmp-`` and ``.old-`` folders of exactly the key ``final`` (not of a key whose name merely starts
    with it: the tag is the last ``-`` part)."""
    tmps: list[Path] = []
    olds: list[Path] = []
    try:
        entries = list(os.scandir(final.parent))
    except FileNotFoundError:
        return tmps, olds
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if match and match["name"] == final.name and entry.is_dir(follow_symlinks=False):
            (tmps if match["kind"] == "tmp" else olds).append(Path(entry.path))
    return tmps, olds


def _discard(folder: Path) -> None:
    """Remove contents that are no longer published (a kill midway leaves a ``.tmp-``/``.old-`` for a sweep)."""
    _point("cleanup", folder)
    shutil.rmtree(folder, ignore_errors=True)


def _lock(fd: int, *, blocking: bool) -> bool:
    """``flock(LOCK_EX)`` on ``fd``: True when held; False when another process holds it (non-blocking) or the
    filesystem refuses locks (then nothing can be proven abandoned)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as exc:
        log.debug("no flock on this filesystem (%s): leftovers of killed writers are kept", exc)
        return False
    return True


@contextmanager
def temp_file(path: Path) -> Iterator[tuple[Path, int]]:
    """A new ``.<name>.tmp-<tag>`` file beside ``path``, open for writing (its descriptor) and locked by this
    process until the block ends; removed at the end unless the block renamed it."""
    while True:
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:16]}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            if _lock(fd, blocking=True) and os.fstat(fd).st_nlink == 0:
                continue  # swept before we held it
            try:
                yield tmp, fd
            finally:
                tmp.unlink(missing_ok=True)
            return
        finally:
            os.close(fd)


def sweep_files(path: Path) -> None:
    """Remove the temporary files of writers of ``path`` that were killed (those no live process holds)."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.tmp-[0-9a-f]{{8,32}}$")
    try:
        entries = [e for e in os.scandir(path.parent) if pattern.match(e.name) and e.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return
    for entry in entries:
        try:
            fd = os.open(entry.path, os.O_RDWR)
        except OSError:
            continue  # gone already, or not ours to open: keep it
        try:
            if _lock(fd, blocking=False):
                with suppress(FileNotFoundError):
                    os.unlink(entry.path)
                log.info("removed %s, left by a writer of %s that was killed", entry.name, path)
        finally:
            os.close(fd)


@contextmanager
def _key_lock(final: Path) -> Iterator[None]:
    """The lock of one key for the two-rename publish and its recovery. The file stays (empty): removing it would
    let a process lock a file that a newer one already replaced."""
    fd = os.open(final.parent / f".lock-{final.name}", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
