"""Launchers start the ``train`` step's worker processes, stream their output, and stop them all on failure.

A :class:`Launcher` runs ``python -m kiln.tasks.training --config <file>`` as ``nproc`` DDP ranks and returns when every
rank has exited. It is the one place that knows *where* the workers run: :class:`LocalTorchrunLauncher` uses
torchrun on this machine; a container launcher implements the same interface.

A launcher stops a job in one of two ways: :meth:`Launcher.terminate` (stop now) and :meth:`Launcher.preempt` (stop
after a checkpoint). Both send SIGTERM, which a rank answers by saving a checkpoint at its loop's next
``save_checkpoint`` and exiting with :data:`~kiln.tasks.training.job.PREEMPTED_EXIT_CODE`, and SIGKILL what is left
after a grace period. torchrun forwards the SIGTERM to its ranks and then waits for them for its
``--shutdown-timeout``, which the launchers set to the job's timeout so that only their own grace period counts.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kiln.tasks.pools.allocation import Allocation
from kiln.tasks.training.job import TrainConfig

log = logging.getLogger(__name__)

#: Every output line of a launch, in the work folder (the exception and result hold only the tail).
LOG_FILE = "train.log"


class TrainingFailedError(RuntimeError):
    """The training job exited non-zero (or was terminated). ``log_tail`` holds its last output lines."""

    def __init__(self, exit_code: int, log_tail: str, reason: str | None = None):
        self.exit_code = exit_code
        self.log_tail = log_tail
        reason = reason or f"exited with code {exit_code}"
        tail = f"; last output lines:\n{log_tail}" if log_tail.strip() else ""
        super().__init__(f"training job {reason}{tail}")


class TrainingTimeoutError(TrainingFailedError):
    """The training job ran longer than ``training.timeout_s`` and was killed."""

    def __init__(self, timeout_s: float, exit_code: int, log_tail: str):
        self.timeout_s = timeout_s
        super().__init__(exit_code, log_tail, reason=f"ran past its {timeout_s:g} s timeout and was killed")


class TrainingPreemptedError(TrainingFailedError):
    """The training job was preempted (:meth:`Launcher.preempt`): asked to checkpoint and exit, and stopped.

    ``exit_code`` is the job's exit status as the launcher saw it: torchrun exits 1 once its ranks have exited on a
    SIGTERM it forwarded (it does not pass on their :data:`~kiln.tasks.training.job.PREEMPTED_EXIT_CODE`); a
    process killed at the grace deadline -9, a container 137.
    """

    def __init__(self, exit_code: int, log_tail: str, *, grace_s: float, killed: bool, reason: str | None = None):
        self.grace_s = grace_s
        self.killed = killed
        """The job did not exit within its grace period and was killed: it saved no checkpoint of its own at the
        signal, and resumes from its last complete checkpoint. ``False``: it exited by itself, after saving the
        checkpoint it was asked for (a rank that crashed instead says so in the log tail)."""
        reason = reason or (
            f"was preempted: it did not exit within its {grace_s:g} s grace period and was killed; it resumes from "
            "its last complete checkpoint" if killed else
            f"was preempted: it checkpointed and exited within its {grace_s:g} s grace period (code {exit_code})")
        super().__init__(exit_code, log_tail, reason=reason)


@dataclass
class Preemption:
    """A launcher's :meth:`Launcher.preempt`, shared with the thread inside :meth:`Launcher.launch`."""

    grace_s: float
    done: threading.Event = field(default_factory=threading.Event)
    """Set once the job is stopped (or there was none to stop)."""
    killed: bool = False
    """Something of the job was still running at the grace deadline and was killed; valid once ``done`` is set."""

    def error(self, exit_code: int, log_tail: str, reason: str | None = None) -> TrainingPreemptedError:
        """The error :meth:`Launcher.launch` raises for the job it stopped (``reason``: instead of the default)."""
        return TrainingPreemptedError(exit_code, log_tail, grace_s=self.grace_s, killed=self.killed, reason=reason)


def refused_launch(preemption: Preemption | None) -> TrainingFailedError:
    """The error of a launch on a launcher that was terminated (or preempted) before the job started."""
    if preemption is not None:
        return preemption.error(-15, "", reason="was preempted before it started")
    return TrainingFailedError(-15, "", reason="was terminated before it started")


@dataclass(frozen=True)
class LaunchResult:
    """A finished, successful training job."""

    exit_code: int
    duration_s: float
    log_tail: str
    """The last output lines of all ranks, newline-separated."""


class Launcher(ABC):
    """Starts a training job's ranks and watches them until all have exited."""

    _output_hooks: tuple[Callable[[str], None], ...] = ()

    def __init__(self) -> None:
        # Re-entrant: terminate() and preempt() may run in a signal handler on the thread that is inside launch().
        self._lock = threading.RLock()
        self._terminated = False
        self._preemption: Preemption | None = None

    def watch_output(self, hook: Callable[[str], None]) -> None:
        """Call ``hook`` with every output line of the jobs this launcher runs (from the thread that reads the
        output; a tuning trial reads its metric lines there). Set it before :meth:`launch`."""
        self._output_hooks = (*self._output_hooks, hook)

    def _output(self, line: str) -> None:
        """Hand one output line to the hooks; a failing hook is logged and the job goes on."""
        for hook in self._output_hooks:
            try:
                hook(line)
            except Exception:  # noqa: BLE001 (the reader thread must keep draining the job's output)
                log.exception("an output hook failed on the line %r", line[:200])

    @abstractmethod
    def launch(self, config: TrainConfig, *, nproc: int, workdir: Path,
               allocation: Allocation | None = None) -> LaunchResult:
        """Run the job to completion.

        Args:
            config: the job; ``config.training.timeout_s`` bounds its whole run and ``max_restarts`` how often the
                whole job is restarted (from its last complete checkpoint) after a failure.
            nproc: number of ranks per node.
            workdir: a folder for the config file and the job's log.
            allocation: the devices leased for the job, one entry per node (rank-0 node first); the job sees only
                these GPUs and CPU cores. ``None``: no lease (a laptop run outside any pool).

        Raises:
            TrainingFailedError: a rank failed (the others are stopped) or :meth:`terminate` was called.
            TrainingPreemptedError: :meth:`preempt` was called (a job that completed meanwhile returns its result).
            TrainingTimeoutError: the job ran past its timeout; every rank was killed.
        """

    @abstractmethod
    def terminate(self) -> None:
        """Stop the running job, if any, and refuse later launches on this instance.

        Safe to call twice, before or after a launch, from another thread or from a signal handler.
        """

    def preempt(self, grace_s: float) -> None:
        """Ask the running job to checkpoint and exit: SIGTERM now, SIGKILL what is left after ``grace_s`` seconds;
        returns once it is stopped. :meth:`launch` then raises :class:`TrainingPreemptedError`. Later launches on
        this instance are refused, as after :meth:`terminate`.

        Safe to call twice (the second call returns at once and changes nothing), before or after a launch, and
        from another thread.
        """
        with self._lock:
            self._terminated = True
            if self._preemption is not None:
                return
            preemption = self._preemption = Preemption(grace_s)
        try:
            preemption.killed = self._stop_within(grace_s)
        finally:
            preemption.done.set()

    @abstractmethod
    def _stop_within(self, grace_s: float) -> bool:
        """SIGTERM the running job (if any), SIGKILL what is left after ``grace_s``; whether anything was killed."""


#: The launchers a spec can name in ``training.launcher``.
LAUNCHERS = ("docker", "local")


def get_launcher(name: str) -> Launcher:
    """A new launcher by name (``training.launcher`` in a pipeline spec).

    Raises:
        ValueError: an unknown name; the message lists the available ones.
    """
    # Imported on demand: the Docker launcher needs the docker SDK, which a local run never loads.
    if name == "local":
        from kiln.tasks.launch.torchrun import LocalTorchrunLauncher

        return LocalTorchrunLauncher()
    if name == "docker":
        from kiln.tasks.launch.docker_gang import DockerGangLauncher

        return DockerGangLauncher()
    raise ValueError(f"unknown launcher {name!r}; available: {', '.join(LAUNCHERS)}")
