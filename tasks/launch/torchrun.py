"""The ``local`` launcher: the job's ranks on this machine, under ``torchrun --standalone``.

The ranks run in this Python environment, so the pipeline's ``code.requirements`` must already be installed here:
:meth:`LocalTorchrunLauncher.launch` checks them first (:mod:`kiln.tasks.launch.requirements_check`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from kiln.tasks.launch.base import (
    LOG_FILE,
    Launcher,
    LaunchResult,
    TrainingFailedError,
    TrainingTimeoutError,
    refused_launch,
)
from kiln.tasks.launch.requirements_check import check_installed
from kiln.tasks.pools.allocation import Allocation
from kiln.tasks.processes import OutputLog, ProcessGroup, start_process, usable_cpus
from kiln.tasks.storage.artifacts import atomic_write_bytes
from kiln.tasks.training.job import CONFIG_FILE, TRAIN_MODULE, TrainConfig

log = logging.getLogger(__name__)


class LocalTorchrunLauncher(Launcher):
    """Runs the ranks on this machine with ``torchrun --standalone`` (gloo on CPU, nccl on GPUs).

    torchrun and its workers get a session of their own, so a timeout or :meth:`terminate` can signal every
    process at once: SIGTERM, then SIGKILL for whatever is left after ``kill_grace_s`` (:meth:`preempt`: after its
    own grace period). torchrun itself stops the other ranks as soon as one fails.
    """

    def __init__(self, *, kill_grace_s: float = 10.0, tail_lines: int = 100, log_prefix: str = "[train]"):
        self.kill_grace_s = kill_grace_s
        self.tail_lines = tail_lines
        self.log_prefix = log_prefix
        super().__init__()
        self._proc: ProcessGroup | None = None

    @property
    def pid(self) -> int | None:
        """Process id of the running torchrun (also its process group id), or ``None``."""
        return self._proc.pid if self._proc else None

    def command(self, config_path: Path, nproc: int, max_restarts: int = 0,
                shutdown_timeout_s: int = 30) -> list[str]:
        """The command line that starts the job (torchrun restarts all ranks together on a failure).

        ``shutdown_timeout_s``: how long torchrun, once signalled, waits for its ranks before it kills them itself.
        """
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                f"--max-restarts={max_restarts}", f"--shutdown-timeout={shutdown_timeout_s}", "-m", TRAIN_MODULE,
                "--config", str(config_path)]

    def launch(self, config: TrainConfig, *, nproc: int, workdir: Path,
               allocation: Allocation | None = None) -> LaunchResult:
        """Run the job to completion (see :meth:`Launcher.launch`).

        Raises:
            RequirementError: a line of ``code.requirements`` is not installed here (checked before anything
                starts; the message names the line, what is installed and the fix).
        """
        check_installed(config.requirements)
        if nproc < 1:
            raise ValueError(f"nproc must be at least 1, found {nproc}")
        if allocation is not None and len(allocation.nodes) != 1:
            raise ValueError(f"the local launcher runs on one node; the lease has {len(allocation.nodes)}")
        workdir = Path(workdir).resolve()
        config_path = atomic_write_bytes(workdir / CONFIG_FILE, config.to_json().encode())
        # The parent environment passes through unchanged (this reads no setting from it).
        env = {**os.environ, "OMP_NUM_THREADS": str(config.training.threads_per_proc), "PYTHONUNBUFFERED": "1"}
        cpus: set[int] = set()
        if allocation is not None:
            node = allocation.master
            # A job sees only the GPUs it leased: none at all when it leased none.
            env["CUDA_VISIBLE_DEVICES"] = node.cuda_visible_devices()
            cpus = usable_cpus(node.cpus)
            log.info("lease %s on node %s: GPUs [%s], CPU cores [%s]", allocation.lease_id, node.node,
                     node.cuda_visible_devices(), node.cpuset())
        timeout_s = config.training.timeout_s
        # torchrun's default (30 s) would cut a longer preemption grace short; this launcher enforces the grace.
        cmd = self.command(config_path, nproc, config.training.max_restarts, shutdown_timeout_s=timeout_s)
        with OutputLog(workdir / LOG_FILE, self.tail_lines, on_line=self._log_line) as output:
            with self._lock:
                if self._terminated:
                    raise refused_launch(self._preemption)
                log.info("launching %d rank(s), timeout %d s: %s", nproc, timeout_s, " ".join(cmd))
                start = time.monotonic()
                # The job dies with this process, even by SIGKILL: a job outliving its task would train on devices
                # the lease store gives to the task's retry.
                proc = self._proc = start_process(cmd, cwd=workdir, env=env, cpus=cpus, output=output,
                                                  die_with_parent=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                log.error("training job ran past its %d s timeout; killing it", timeout_s)
            finally:
                with self._lock:
                    preemption = self._preemption
                if preemption is not None:
                    preemption.done.wait()  # the thread in preempt() stops the job, within its grace period
                elif proc.poll() != 0:
                    # After a timeout, a failed job's leftovers, or an interrupted wait in this thread.
                    self._stop(proc)
            code = proc.wait()
            proc.join_output(timeout=self.kill_grace_s)
        duration = time.monotonic() - start
        log_tail = "\n".join(output.tail)
        if code != 0 and preemption is not None:
            raise preemption.error(code, log_tail)
        if timed_out:
            raise TrainingTimeoutError(timeout_s, code, log_tail)
        if code != 0:
            raise TrainingFailedError(code, log_tail, reason="was terminated" if self._terminated else None)
        log.info("training job finished in %.1f s", duration)
        return LaunchResult(exit_code=code, duration_s=duration, log_tail=log_tail)

    def terminate(self) -> None:
        with self._lock:
            self._terminated = True
            proc = self._proc
        if proc is not None:
            self._stop(proc)

    def _stop_within(self, grace_s: float) -> bool:
        with self._lock:
            proc = self._proc
        return proc is not None and bool(proc.stop(grace_s, what="preempted training processes"))

    def _log_line(self, line: str) -> None:
        log.info("%s %s", self.log_prefix, line)
        self._output(line)

    def _stop(self, proc: ProcessGroup) -> None:
        """SIGTERM the job's process group, then SIGKILL whatever is left after the grace period."""
        proc.stop(self.kill_grace_s, what="training processes")
