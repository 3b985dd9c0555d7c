"""The ``local`` launcher: the job's ranks on this machine, under ``torchrun --standalone``."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO

from kiln.tasks.launch.base import LOG_FILE, Launcher, LaunchResult, TrainingFailedError, TrainingTimeoutError
from kiln.tasks.pools.allocation import Allocation
from kiln.tasks.storage.artifacts import atomic_write_bytes
from kiln.tasks.training.job import CONFIG_FILE, TRAIN_MODULE, TrainConfig

log = logging.getLogger(__name__)


class LocalTorchrunLauncher(Launcher):
    """Runs the ranks on this machine with ``torchrun --standalone`` (gloo on CPU, nccl on GPUs).

    torchrun and its workers get a session of their own, so a timeout or :meth:`terminate` can signal every
    process at once: SIGTERM, then SIGKILL for whatever is left after ``kill_grace_s``. torchrun itself stops the
    other ranks as soon as one fails.
    """

    def __init__(self, *, kill_grace_s: float = 10.0, tail_lines: int = 100, log_prefix: str = "[train]"):
        self.kill_grace_s = kill_grace_s
        self.tail_lines = tail_lines
        self.log_prefix = log_prefix
        # Re-entrant: terminate() may run in a signal handler on the thread that is inside launch().
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[str] | None = None
        self._terminated = False

    @property
    def pid(self) -> int | None:
        """Process id of the running torchrun (also its process group id), or ``None``."""
        return self._proc.pid if self._proc else None

    def command(self, config_path: Path, nproc: int, max_restarts: int = 0) -> list[str]:
        """The command line that starts the job (torchrun restarts all ranks together on a failure)."""
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                f"--max-restarts={max_restarts}", "-m", TRAIN_MODULE, "--config", str(config_path)]

    def launch(self, config: TrainConfig, *, nproc: int, workdir: Path,
               allocation: Allocation | None = None) -> LaunchResult:
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
        cmd = self.command(config_path, nproc, config.training.max_restarts)
        timeout_s = config.training.timeout_s
        tail: deque[str] = deque(maxlen=self.tail_lines)
        with self._lock:
            if self._terminated:
                raise TrainingFailedError(-signal.SIGTERM, "", reason="was terminated before it started")
            log.info("launching %d rank(s), timeout %d s: %s", nproc, timeout_s, " ".join(cmd))
            start = time.monotonic()
            proc = self._proc = subprocess.Popen(
                cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                bufsize=1, errors="replace", start_new_session=True,
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        assert proc.stdout is not None
        pump = threading.Thread(target=self._pump, args=(proc.stdout, workdir / LOG_FILE, tail),
                                name="train-log-pump", daemon=True)
        pump.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            log.error("training job ran past its %d s timeout; killing it", timeout_s)
        finally:
            # After a timeout, a failed job's leftovers, or an interrupted wait in this thread.
            if proc.poll() != 0:
                self._kill_group(proc)
        code = proc.wait()
        pump.join(timeout=self.kill_grace_s)
        duration = time.monotonic() - start
        log_tail = "\n".join(tail)
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
            self._kill_group(proc)

    def _pump(self, stream: IO[str], log_file: Path, tail: deque[str]) -> None:
        """Copy the job's output, line by line as it arrives, to the logger, the log file and the tail."""
        with open(log_file, "a", encoding="utf-8") as fh:
            for raw in stream:
                line = raw.rstrip("\n")
                tail.append(line)
                fh.write(raw)
                fh.flush()
                log.info("%s %s", self.log_prefix, line)

    def _kill_group(self, proc: subprocess.Popen[str]) -> None:
        """SIGTERM the job's process group, then SIGKILL it if anything is left after the grace period."""
        pgid = proc.pid  # start_new_session made torchrun the leader of its own group
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + self.kill_grace_s
        while time.monotonic() < deadline:
            proc.poll()  # reap torchrun so that an empty group reads as gone
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        log.warning("training processes still alive %g s after SIGTERM; sending SIGKILL", self.kill_grace_s)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def usable_cpus(leased: tuple[int, ...]) -> set[int]:
    """The leased cores this process may run on; an inventory can name cores this machine lacks (a test
    stand-in, or a node entry meant for another host), and pinning to those would fail."""
    usable = set(leased) & os.sched_getaffinity(0)
    if leased and usable != set(leased):
        log.warning("leased CPU cores %s are not all available here (have %s); pinning to %s",
                    sorted(leased), sorted(os.sched_getaffinity(0)), sorted(usable) or "no core (not pinned)")
    return usable
