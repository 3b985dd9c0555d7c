"""Child processes that can be stopped whole: started in a session of their own, output streamed or logged.

:func:`start_process` runs a command as the leader of a new session (so of a new process group, whose id is its
pid), stdin from ``/dev/null``, its output streamed line by line to an :class:`OutputLog` (a log file, a bounded
tail, a logger) or appended to a file (a process that may outlive this one: a model server, a service).
:func:`stop_groups` stops whole groups and the descendants that left them: SIGTERM, a grace period, SIGKILL. This
is the one place that starts such processes: what every child gets is set in :func:`start_process` and
:func:`_child_setup` alone.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from contextlib import suppress
from pathlib import Path
from typing import IO, Any

import psutil

from kiln.tasks.parent_death import die_with_parent, prctl

log = logging.getLogger(__name__)

#: How often a stop looks whether the processes it signalled are gone.
POLL_S = 0.05
#: How long a stop waits for SIGKILLed processes to go (the kernel needs a moment for a large address space).
KILL_WAIT_S = 5.0
#: How long a stop waits for its exited processes to be reaped by their parents (init, for orphans), so that the
#: group is gone from the process table, not only dead, when it returns.
REAP_WAIT_S = 2.0
#: The most of a log file :func:`tail` reads: a service's log grows without bound.
TAIL_MAX_BYTES = 1 << 20


class OutputLog:
    """Output lines, as they arrive, to a log file (appended), a bounded tail and a callback; thread-safe.

    Args:
        path: the log file, opened for appending now; ``None``: no file.
        tail_lines: how many of the last lines :attr:`tail` keeps.
        on_line: called with every line (without its newline) after it was recorded, e.g. a logger's ``info``.
    """

    def __init__(self, path: Path | None = None, tail_lines: int = 100,
                 on_line: Callable[[str], None] | None = None) -> None:
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self._on_line = on_line
        self._lock = threading.Lock()
        self._file: IO[str] | None = open(path, "a", encoding="utf-8") if path is not None else None

    def write(self, line: str) -> None:
        """Record one line (no trailing newline)."""
        with self._lock:
            self.tail.append(line)
            if self._file is not None and not self._file.closed:  # a straggler may write after close()
                self._file.write(line + "\n")
                self._file.flush()
        if self._on_line is not None:
            self._on_line(line)

    def close(self) -> None:
        """Close the log file; later lines still reach the tail and the callback."""
        with self._lock:
            if self._file is not None:
                self._file.close()

    def __enter__(self) -> OutputLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ProcessGroup:
    """A command started by :func:`start_process`: the leader of its own session and process group."""

    def __init__(self, popen: subprocess.Popen, pump: threading.Thread | None) -> None:
        self.popen = popen
        self._pump = pump

    @property
    def pid(self) -> int:
        """The leader's pid, which is also the id of its process group."""
        return self.popen.pid

    def poll(self) -> int | None:
        """The leader's exit code (negative: the signal that ended it), ``None`` while it runs."""
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        """The leader's exit code, once it exited. Raises ``subprocess.TimeoutExpired`` after ``timeout`` s."""
        return self.popen.wait(timeout=timeout)

    def join_output(self, timeout: float | None = None) -> bool:
        """Wait until the streamed output has ended (every process holding the pipe exited); return whether it
        has. Always true for output that goes to a file."""
        if self._pump is not None:
            self._pump.join(timeout)
        return self._pump is None or not self._pump.is_alive()

    def stop(self, grace_s: float, what: str = "processes") -> list[int]:
        """Stop the whole group and its descendants (see :func:`stop_groups`); safe to call again, from another
        thread or from a signal handler, also once everything has exited."""
        return stop_groups({self.pid}, grace_s=grace_s, children=[self], what=what)


def _child_setup(cpus: Collection[int], dies_with_parent: bool) -> Callable[[], None] | None:
    """What runs in the child between fork and exec, so that all it starts inherits it too (``None``: nothing,
    and no fork hook at all, which is safer in a process with threads)."""
    cores = set(cpus)
    if not cores and not dies_with_parent:
        return None
    parent = os.getpid()
    if dies_with_parent:
        prctl()  # looked up before the fork

    def setup() -> None:
        if dies_with_parent:
            die_with_parent(signal.SIGKILL, parent)
        if cores:
            os.sched_setaffinity(0, cores)

    return setup


def start_process(argv: list[str], *, output: OutputLog | Path, cwd: Path | None = None,
                  env: dict[str, str] | None = None, cpus: Collection[int] = (),
                  die_with_parent: bool = False) -> ProcessGroup:
    """Start ``argv`` in a new session (its own process group), stdin from ``/dev/null``.

    Args:
        argv: the command line (no shell).
        output: where stdout and stderr go: an :class:`OutputLog`, streamed line by line on a daemon thread (the
            caller closes it after :meth:`ProcessGroup.join_output`); or a file, appended to, for a process that
            may outlive this one.
        cwd: its working folder (default: this process's).
        env: its complete environment (default: this process's).
        cpus: the CPU cores it (and all it starts) may run on; empty: not pinned.
        die_with_parent: SIGKILL it when this process (precisely: the calling thread) dies, even by SIGKILL, as
            the OOM killer does: a job must not outlive the task that leased its devices. What it starts must see
            to its own children (a training rank asks for the same, see :mod:`kiln.tasks.training.loop`).

    Returns:
        The running process.

    Raises:
        OSError: the command could not be started (not found, not executable, a bad ``cwd``).
    """
    common: dict[str, Any] = {"cwd": cwd, "env": env, "stdin": subprocess.DEVNULL, "stderr": subprocess.STDOUT,
                              "start_new_session": True, "close_fds": True,
                              "preexec_fn": _child_setup(cpus, die_with_parent)}
    if isinstance(output, OutputLog):
        popen = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, bufsize=1, errors="replace", **common)
        pump = threading.Thread(target=_pump, args=(popen.stdout, output), name=f"output-of-{popen.pid}",
                                daemon=True)
        pump.start()
        return ProcessGroup(popen, pump)
    with open(output, "ab") as out:  # the child keeps a descriptor of its own
        return ProcessGroup(subprocess.Popen(argv, stdout=out, **common), None)


def _pump(stream: IO[str], output: OutputLog) -> None:
    with stream:
        for raw in stream:
            output.write(raw.rstrip("\n"))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now (the kernel's pick), for a process about to bind it."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (exited, not yet reaped by its parent) does not."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # another user's process: it exists


def process_tree(groups: Collection[int]) -> set[int]:
    """Live processes of the given process groups (ids = their leaders' pids) and all their descendants, also
    those that started a session of their own."""
    found: set[int] = set()
    for leader in groups:
        with suppress(psutil.NoSuchProcess):
            found.update(c.pid for c in psutil.Process(leader).children(recursive=True))
    for proc in psutil.process_iter():
        with suppress(ProcessLookupError, psutil.NoSuchProcess):
            if os.getpgid(proc.pid) in groups:
                found.add(proc.pid)
    return {pid for pid in found | set(groups) if alive(pid)}


def stop_groups(groups: Collection[int], *, grace_s: float, children: Iterable[ProcessGroup] = (),
                also: Iterable[int] = (), what: str = "processes") -> list[int]:
    """SIGTERM whole process groups, wait up to ``grace_s`` for them and every descendant, SIGKILL the rest.

    A TERM to a single process can orphan its children, so whole groups are signalled; descendants that left
    their group (a session of their own) are found from the process tree first and signalled one by one. With
    no lock, only signals and polls, it is safe twice, from two threads at once, or from a signal handler.

    Args:
        groups: process group ids (= their leaders' pids).
        grace_s: seconds between SIGTERM and SIGKILL; 0 sends SIGKILL at once.
        children: the leaders this process started itself, reaped while waiting (else they stay zombies).
        also: more pids to stop (descendants seen earlier that may have left the tree since).
        what: names the processes in the warning logged when some are still alive after the grace period.

    Returns:
        The pids that had to be killed.
    """
    groups, children = set(groups), list(children)
    members = process_tree(groups) | {pid for pid in also if alive(pid)}
    if grace_s > 0:
        _signal(groups, members, signal.SIGTERM)
        _wait_gone(members, children, grace_s)
    # Also what the group started during the grace period.
    left = {pid for pid in members if alive(pid)} | process_tree(groups)
    if left:
        if grace_s > 0:
            log.warning("%s still alive %g s after SIGTERM; sending SIGKILL: %s", what, grace_s, _describe(left))
        _signal(groups, left, signal.SIGKILL)
        _wait_gone(left, children, KILL_WAIT_S)
    _wait_reaped(members | left, children, REAP_WAIT_S)
    return sorted(left)


def _signal(groups: set[int], pids: set[int], sig: int) -> None:
    for pgid in groups:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    for pid in pids:  # those outside the groups: they got nothing from killpg
        with suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) not in groups:
                os.kill(pid, sig)


def _wait_gone(pids: set[int], children: list[ProcessGroup], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        for child in children:
            child.poll()  # reap it: an exited child stays a zombie in its group until then
        if not any(alive(pid) for pid in pids) or time.monotonic() >= deadline:
            return
        time.sleep(POLL_S)


def _wait_reaped(pids: set[int], children: list[ProcessGroup], timeout_s: float) -> None:
    """Wait (bounded) until the dead ``pids`` have left the process table: a caller that looks at the group next
    (``killpg(pgid, 0)``) then finds it gone, not a set of zombies their new parent has yet to reap."""
    deadline = time.monotonic() + timeout_s
    while True:
        for child in children:
            child.poll()
        if not any(psutil.pid_exists(pid) for pid in pids) or time.monotonic() >= deadline:
            return
        time.sleep(POLL_S)


def _describe(pids: set[int]) -> str:
    """``pid (command line)`` of each process, for the log."""
    out = []
    for pid in sorted(pids):
        with suppress(psutil.Error):
            out.append(f"{pid} ({' '.join(psutil.Process(pid).cmdline())[:80]})")
    return ", ".join(out)


def tail(path: Path, lines: int = 30, offset: int = 0) -> str:
    """The last ``lines`` lines of a text file from byte ``offset`` on ('' if it does not exist); at most the
    last :data:`TAIL_MAX_BYTES` are read."""
    try:
        with open(path, "rb") as fh:
            start = max(offset, fh.seek(0, os.SEEK_END) - TAIL_MAX_BYTES)
            fh.seek(start)
            kept = fh.read().decode("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    if start > offset:
        kept = kept[1:]  # the read began inside a line
    return "\n".join(deque(kept, maxlen=lines))


def usable_cpus(leased: Collection[int]) -> set[int]:
    """The leased cores this process may run on; an inventory can name cores this machine lacks (a test
    stand-in, or a node entry meant for another host), and pinning to those would fail."""
    usable = set(leased) & os.sched_getaffinity(0)
    if leased and usable != set(leased):
        log.warning("leased CPU cores %s are not all available here (have %s); pinning to %s",
                    sorted(leased), sorted(os.sched_getaffinity(0)), sorted(usable) or "no core (not pinned)")
    return usable
