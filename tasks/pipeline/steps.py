"""The one ordered list of a pipeline run's steps: the DAG factory, the operators and the in-process runner all
read it.

Each step is a function of the run's context that publishes its output under its key and returns a typed result
(its Airflow task's XCom); its module in :mod:`kiln.tasks.steps` is named as its task id. The step modules import
their heavy libraries inside their functions, so importing this list costs a DAG file almost nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.cache_keys import (
    CacheKey,
    build_features_key,
    clean_key,
    ingest_key,
    not_cached,
    train_key,
    validate_key,
)
from kiln.tasks.pipeline.context import RunContext, StepResult
from kiln.tasks.spec import PipelineSpec
from kiln.tasks.steps.build_features import build_features
from kiln.tasks.steps.clean import clean
from kiln.tasks.steps.deploy import deploy
from kiln.tasks.steps.evaluate import evaluate
from kiln.tasks.steps.gate import gate
from kiln.tasks.steps.infra_validate import infra_validate
from kiln.tasks.steps.ingest import ingest
from kiln.tasks.steps.promote import promote
from kiln.tasks.steps.register import register
from kiln.tasks.steps.study import study
from kiln.tasks.steps.train import train, train_best
from kiln.tasks.steps.validate import record_cached_validation, validate
from kiln.tasks.steps.verify import verify


@dataclass(frozen=True)
class Step:
    """One step of a run."""

    name: str
    """The Airflow task id, the step's module name and the key of its output."""
    run: Callable[[RunContext], StepResult]
    leased: bool = False
    """It runs on devices leased from a resource pool (the DAG gives it the leasing operator)."""
    cache_key: Callable[[RunContext], CacheKey | None] = not_cached
    """The key of the step's output in this run (:mod:`kiln.tasks.pipeline.cache_keys`); ``None``: not cacheable
    (the default). The step cache (:func:`kiln.tasks.pipeline.step_cache.run_step`) reuses an earlier run's output
    under the same key."""
    on_hit: Callable[[RunContext, dict[str, Any]], None] | None = None
    """What a cache hit must still do to this run besides publishing the earlier run's output (``validate``: log
    its report to this run's MLflow run and publish the accepted snapshot); called with the republished result."""


STEPS: tuple[Step, ...] = (
    Step(keys.INGEST, ingest, cache_key=ingest_key),
    Step(keys.VALIDATE, validate, cache_key=validate_key, on_hit=record_cached_validation),
    Step(keys.CLEAN, clean, cache_key=clean_key),
    Step(keys.BUILD_FEATURES, build_features, cache_key=build_features_key),
    Step(keys.TRAIN, train, leased=True, cache_key=train_key),
    Step(keys.EVALUATE, evaluate),
    Step(keys.REGISTER, register),
    Step(keys.GATE, gate),
    Step(keys.INFRA_VALIDATE, infra_validate),
    Step(keys.DEPLOY, deploy),
    Step(keys.VERIFY, verify),
    Step(keys.PROMOTE, promote),
)

#: A tuned run (the spec's ``tuning:``) replaces ``train`` with these two, and maps one ``trial`` task
#: (:mod:`kiln.tasks.steps.trial`, on leased devices) over the study's indices between them.
STUDY = Step(keys.STUDY, study)
TRAIN_BEST = Step(keys.TRAIN, train_best)


def steps_of(spec: PipelineSpec) -> tuple[Step, ...]:
    """The steps of a run of ``spec`` in order: :data:`STEPS`, or for a tuned spec ``study`` and the best trial's
    ``train`` in place of ``train`` (the trials run between them)."""
    if spec.tuning is None:
        return STEPS
    at = [s.name for s in STEPS].index(keys.TRAIN)
    return (*STEPS[:at], STUDY, TRAIN_BEST, *STEPS[at + 1:])


def step_named(name: str) -> Step:
    """The step whose task id is ``name``.

    Raises:
        KeyError: no such step (the message lists them).
    """
    for step in (*STEPS, STUDY):
        if step.name == name:
            return step
    raise KeyError(f"unknown step {name!r}; steps: {', '.join(s.name for s in (*STEPS, STUDY))}")
