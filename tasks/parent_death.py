"""A process that dies with its parent: Linux ``PR_SET_PDEATHSIG``, for children that must not outlive their owner.

A training job must not outlive the task that leased its devices: were it to run on after the task was killed
(SIGKILL, as the OOM killer sends), the lease would expire, a retry would be granted the same devices and two jobs
would train at once. :func:`kiln.tasks.processes.start_process` asks for this for the job's launcher (torchrun);
torchrun starts each rank in a session of its own, so a rank asks for it too (:func:`die_with_torchrun`).
Imports nothing beyond the standard library: the training image runs it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
from typing import Any

#: ``prctl`` option that asks the kernel for a signal when the parent dies (linux/prctl.h).
_PR_SET_PDEATHSIG = 1
#: What a rank's parent runs: the torchrun agent (``python -m torch.distributed.run`` or the ``torchrun`` script).
_TORCHRUN_MARKERS = (b"torch.distributed.run", b"torchrun")


@functools.cache
def prctl() -> Any:
    """libc's ``prctl``, looked up once: a lookup between fork and exec could take a lock that another thread
    held at the fork, so a parent calls this before it forks."""
    return ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies.

    The kernel watches the *thread* that forked this process: a child started from a thread that exits earlier
    gets the signal then.

    Args:
        sig: the signal to get.
        parent: the pid the parent had; when the parent died before the request (this process was re-parented
            already), exit at once instead of running on unwatched. ``None``: do not check.
    """
    if prctl()(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent is not None and os.getppid() != parent:
        os._exit(128 + int(sig))  # the signal the parent's death would have sent will never come


def die_with_torchrun() -> bool:
    """In a rank that torchrun started: get SIGKILL when torchrun dies; exit at once if it died already.

    Returns:
        Whether this process runs under torchrun (``TORCHELASTIC_RUN_ID`` is set); nothing is done otherwise.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    parent = os.getppid()
    die_with_parent(signal.SIGKILL)
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as fh:
            cmdline = fh.read()
    except OSError:
        cmdline = b""
    if os.getppid() != parent or not any(marker in cmdline for marker in _TORCHRUN_MARKERS):
        os._exit(128 + signal.SIGKILL)  # re-parented before the request took effect: torchrun is gone
    return True
