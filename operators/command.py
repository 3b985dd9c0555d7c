"""``PooledCommandOperator``: run any command on devices leased from a resource pool."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowException, AirflowSkipException

from kiln.operators.pools import PooledOperator

if TYPE_CHECKING:
    from kiln.tasks.pools.allocation import Allocation, LeaseRequest
    from kiln.tasks.processes import ProcessGroup

#: Seconds to wait for the rest of the output once the command's group is gone (a descendant that escaped it may
#: still hold the pipe).
OUTPUT_DRAIN_S = 10.0


class PooledCommandOperator(PooledOperator):
    """Lease devices, then run ``command`` with the allocation injected into its environment.

    The command sees ``CUDA_VISIBLE_DEVICES`` (only the leased GPUs; empty when none), ``KILN_LEASE_ID``,
    ``KILN_CPUSET`` and ``KILN_MEMORY_LIMIT`` (bytes), and runs pinned to the leased CPU cores that exist on this
    machine. Exit code 0 succeeds, ``skip_on_exit_code`` skips, anything else fails with the output's tail.

    Args:
        command: argv list (no shell).
        resource_pool, gpus, gpu_memory_min, cpus, memory, team, priority, placement, ttl_s: the lease request
            (one node); sizes as bytes or strings such as ``16GiB``.
        preemptible: the command checkpoints: when the lease is preempted it gets SIGTERM and ``preempt_grace_s``
            seconds to save its state and exit (then SIGKILL); the task queues for devices again and runs the
            command anew, which resumes from what it saved.
        wait_timeout_s: how long the request may wait (deferred, in the triggerer) before the task fails.
        env: extra environment variables.
    """

    template_fields: Sequence[str] = ("command", "env")

    def __init__(self, *, command: list[str], resource_pool: str = "local", gpus: int = 0,
                 gpu_memory_min: int | str = 0, cpus: int = 0, memory: int | str = 0, team: str = "default",
                 priority: int | None = None, placement: str | None = None, ttl_s: float = 60.0,
                 preemptible: bool = False, preempt_grace_s: float = 60.0, wait_timeout_s: float = 3600.0,
                 env: dict[str, str] | None = None,
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
        self.preemptible = preemptible
        self.preempt_grace_s = preempt_grace_s
        self.wait_timeout_s = wait_timeout_s
        self.env = env or {}
        self.skip_on_exit_code = skip_on_exit_code
        self._proc: ProcessGroup | None = None

    def lease_request(self, context: Any) -> tuple[LeaseRequest, float]:
        from kiln.tasks.pools.allocation import LeaseRequest, parse_size

        request = LeaseRequest(
            pool=self.resource_pool, gpus=self.gpus, cpus=self.cpus, team=self.team, priority=self.priority,
            gpu_memory_min=parse_size(self.gpu_memory_min, field_name="gpu_memory_min"),
            memory=parse_size(self.memory, field_name="memory"), placement=self.placement,  # type: ignore[arg-type]
            ttl_s=self.ttl_s, preemptible=self.preemptible, grace_s=self.preempt_grace_s)
        return request, self.wait_timeout_s

    def run_leased(self, context: Any, allocation: Allocation) -> int:
        from kiln.tasks.processes import OutputLog, start_process, usable_cpus

        node = allocation.master
        env = {**os.environ, **self.env, "CUDA_VISIBLE_DEVICES": node.cuda_visible_devices(),
               "KILN_LEASE_ID": allocation.lease_id, "KILN_CPUSET": node.cpuset(),
               "KILN_MEMORY_LIMIT": str(node.memory)}
        output = OutputLog(tail_lines=50, on_line=lambda line: self.log.info("%s", line))
        self._proc = proc = start_process(self.command, env=env, cpus=usable_cpus(node.cpus), output=output,
                                          die_with_parent=True)
        try:
            code = proc.wait()
        finally:
            self.stop_work()  # what the command left running dies with it: the lease is released next
            proc.join_output(timeout=OUTPUT_DRAIN_S)
            self._proc = None
        if code == 0:
            return code
        if self.skip_on_exit_code is not None and code == self.skip_on_exit_code:
            raise AirflowSkipException(f"command exited with {code}")
        raise AirflowException(f"command exited with {code}; last lines:\n" + "\n".join(output.tail))

    def stop_work(self) -> None:
        proc = self._proc
        if proc is not None:
            proc.stop(grace_s=0)  # SIGKILL at once: the lease is lost or the task was killed

    def preempt_work(self, grace_s: float) -> None:
        proc = self._proc
        if proc is not None:
            proc.stop(grace_s=grace_s, what="preempted command")
