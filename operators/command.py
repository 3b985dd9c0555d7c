"""``PooledCommandOperator``: run any command on devices leased from a resource pool."""

from __future__ import annotations

import os
import signal
import subprocess
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowException, AirflowSkipException

from kiln.operators.pools import PooledOperator

if TYPE_CHECKING:
    from kiln.tasks.pools.allocation import Allocation, LeaseRequest


class PooledCommandOperator(PooledOperator):
    """Lease devices, then run ``command`` with the allocation injected into its environment.

    The command sees ``CUDA_VISIBLE_DEVICES`` (only the leased GPUs; empty when none), ``KILN_LEASE_ID``,
    ``KILN_CPUSET`` and ``KILN_MEMORY_LIMIT`` (bytes), and runs pinned to the leased CPU cores that exist on this
    machine. Exit code 0 succeeds, ``skip_on_exit_code`` skips, anything else fails with the output's tail.

    Args:
        command: argv list (no shell).
        resource_pool, gpus, gpu_memory_min, cpus, memory, team, priority, placement, ttl_s: the lease request
            (one node); sizes as bytes or strings such as ``16GiB``.
        wait_timeout_s: how long the request may wait (deferred, in the triggerer) before the task fails.
        env: extra environment variables.
    """

    template_fields: Sequence[str] = ("command", "env")

    def __init__(self, *, command: list[str], resource_pool: str = "local", gpus: int = 0,
                 gpu_memory_min: int | str = 0, cpus: int = 0, memory: int | str = 0, team: str = "default",
                 priority: int | None = None, placement: str | None = None, ttl_s: float = 60.0,
                 wait_timeout_s: float = 3600.0, env: dict[str, str] | None = None,
                 skip_on_exit_code: int | None = 99, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.command = command
        self.resource_pool = resource_pool
        self.gpus = gpus
        self.gpu_memory_min = gpu_memory_min
        self.cpus = cpus
        self.memory = memory
        self.team = team
        self.priority = priority
        self.placement = placement
        self.ttl_s = ttl_s
        self.wait_timeout_s = wait_timeout_s
        self.env = env or {}
        self.skip_on_exit_code = skip_on_exit_code
        self._proc: subprocess.Popen[str] | None = None

    def lease_request(self, context: Any) -> tuple[LeaseRequest, float]:
        from kiln.tasks.pools.allocation import LeaseRequest, parse_size

        request = LeaseRequest(
            pool=self.resource_pool, gpus=self.gpus, cpus=self.cpus, team=self.team, priority=self.priority,
            gpu_memory_min=parse_size(self.gpu_memory_min, field_name="gpu_memory_min"),
            memory=parse_size(self.memory, field_name="memory"), placement=self.placement,  # type: ignore[arg-type]
            ttl_s=self.ttl_s)
        return request, self.wait_timeout_s

    def run_leased(self, context: Any, allocation: Allocation) -> int:
        node = allocation.master
        env = {**os.environ, **self.env, "CUDA_VISIBLE_DEVICES": node.cuda_visible_devices(),
               "KILN_LEASE_ID": allocation.lease_id, "KILN_CPUSET": node.cpuset(),
               "KILN_MEMORY_LIMIT": str(node.memory)}
        from kiln.tasks.launch.torchrun import usable_cpus

        cores = usable_cpus(node.cpus)
        tail: deque[str] = deque(maxlen=50)
        self._proc = proc = subprocess.Popen(
            self.command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            errors="replace", start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                tail.append(line.rstrip("\n"))
                self.log.info("%s", tail[-1])
            code = proc.wait()
        finally:
            self.stop_work()
            self._proc = None
        if code == 0:
            return code
        if self.skip_on_exit_code is not None and code == self.skip_on_exit_code:
            raise AirflowSkipException(f"command exited with {code}")
        raise AirflowException(f"command exited with {code}; last lines:\n" + "\n".join(tail))

    def stop_work(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
