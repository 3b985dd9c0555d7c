"""What a tuned run's steps share (``study``, ``trial`` and the best trial's ``train``): the run's Optuna study and
what one trial leases."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.pipeline.training_run import lease_request
from kiln.tasks.pools.allocation import LeaseRequest
from kiln.tasks.spec import PipelineSpec

if TYPE_CHECKING:
    import optuna

    from kiln.tasks.pools.inventory import Inventory

#: Trial user attribute: the seconds its training job ran (restarts included).
DURATION_ATTR = "kiln_duration_s"


def open_run_study(ctx: RunContext) -> optuna.Study:
    """The run's study, ``<pipeline>/<run id>`` in the lease store's database (created on first use)."""
    from kiln.tasks.tuning import open_study

    return open_study(ctx.spec, ctx.run_key.split("/", 1)[1])


def trial_request(spec: PipelineSpec, run_key: str | None = None, inventory: Inventory | None = None) -> LeaseRequest:
    """What one trial leases: the ``train`` step's request, one priority below it, and preemptible; with
    ``run_key``, capped at ``tuning.parallel`` trials of the run holding devices at once (a run's
    ``tuning_parallel`` Param may ask for fewer than the DAG's mapped-task limit, the spec's)."""
    from kiln.tasks.pools.inventory import Inventory

    request = lease_request(spec)
    priority = request.priority
    if priority is None:
        inventory = inventory or Inventory.from_settings()
        team = inventory.teams.get(request.team)
        priority = team.priority if team is not None else 0
    request = replace(request, priority=priority - 1, preemptible=True)
    if run_key is not None and spec.tuning is not None:
        request = replace(request, group=f"study:{run_key}", group_limit=spec.tuning.parallel)
    return request
