"""The ``study`` step of a tuned run (the spec's ``tuning:``): open the run's Optuna study and hand out one index
per trial, after checking that the pool could hold the trials the spec runs at once.

The DAG maps one ``trial`` task over the indices (:mod:`kiln.tasks.steps.trial`). A restarted run opens the same
study (``<pipeline>/<run id>`` in the lease store's database): finished trials are kept and trial numbers never
repeat.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.pools.allocation import UnsatisfiableRequestError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyPlan:
    """The study a tuned run searches in, and the trial indices its ``trial`` tasks take."""

    study_name: str
    metric: str
    direction: str
    trials: int
    parallel: int
    finished: int
    """Trials of this study that had finished before this step ran (a restarted run keeps them)."""
    indices: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the step's XCom value)."""
        return asdict(self)


def study(ctx: RunContext) -> StudyPlan:
    """Open the run's study and return the indices of its trials.

    Raises:
        ValueError: the spec has no ``tuning`` section.
        UnsatisfiableRequestError: one trial's devices could never be leased, or the pool (or the team's quota)
            could not hold ``tuning.parallel`` trials at once; the message names the field and the most it can.
    """
    from kiln.tasks.pipeline.tuned_run import open_run_study, trial_request
    from kiln.tasks.pools.inventory import Inventory
    from kiln.tasks.pools.placement import copies_at_once

    spec = ctx.spec
    tuning = spec.tuning
    if tuning is None:
        raise ValueError(f"pipeline {spec.name!r} has no tuning section: the study step runs tuned pipelines only")
    request = trial_request(spec)
    fits = copies_at_once(Inventory.from_settings(), request, tuning.parallel)
    if fits < tuning.parallel:
        raise UnsatisfiableRequestError(
            f"tuning.parallel: {tuning.parallel} trials at once, each {request.describe()}, but pool "
            f"{request.pool!r} (team {request.team!r}) can hold at most {fits} at once; set tuning.parallel "
            f"(or the Param tuning_parallel) to at most {fits}")
    opened = open_run_study(ctx)
    finished = sum(t.state.is_finished() for t in opened.get_trials(deepcopy=False))
    return StudyPlan(study_name=opened.study_name, metric=tuning.metric(spec), direction=tuning.direction(spec),
                     trials=tuning.trials, parallel=tuning.parallel, finished=finished,
                     indices=list(range(tuning.trials)))
