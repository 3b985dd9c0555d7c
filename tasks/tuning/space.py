"""A spec's search space as Optuna distributions, a trial's values drawn from it, and the spec a trial trains.

A categorical field whose choices are not all scalars (``model.hidden_sizes: [[64, 32], [128]]``) is stored in the
study as the choices' JSON text, which Optuna can hold and its dashboard shows; :func:`suggest` and
:func:`trial_values` give the decoded values back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import BaseTrial, FrozenTrial

from kiln.tasks.spec import DistributionSpec, PipelineSpec, parse_spec
from kiln.tasks.spec.base import set_field

_SCALARS = (type(None), bool, int, float, str)


def _encoded(dist: DistributionSpec) -> bool:
    """Whether the choices are stored as JSON text (Optuna holds only None, bools, numbers and strings)."""
    return dist.type == "categorical" and not all(isinstance(c, _SCALARS) for c in dist.choices or [])


def to_optuna(dist: DistributionSpec) -> BaseDistribution:
    """One field's range as an Optuna distribution."""
    if dist.type == "categorical":
        choices = [json.dumps(c) for c in dist.choices or []] if _encoded(dist) else list(dist.choices or [])
        return CategoricalDistribution(choices)
    assert dist.low is not None and dist.high is not None  # checked by the spec
    if dist.type == "int":
        return IntDistribution(int(dist.low), int(dist.high), log=bool(dist.log), step=dist.step or 1)
    return FloatDistribution(float(dist.low), float(dist.high), log=dist.type == "log_uniform")


def distributions(space: Mapping[str, DistributionSpec]) -> dict[str, BaseDistribution]:
    """The search space as Optuna distributions, keyed by the dotted spec field."""
    return {field: to_optuna(dist) for field, dist in space.items()}


def _decode(dist: DistributionSpec, value: Any) -> Any:
    return json.loads(value) if _encoded(dist) else value


def suggest(trial: BaseTrial, space: Mapping[str, DistributionSpec]) -> dict[str, Any]:
    """Draw (or, for a trial that drew them already, read back) a value for each field of ``space``.

    Returns:
        Dotted spec field -> value, as the spec takes it (lists decoded).
    """
    values: dict[str, Any] = {}
    for field, dist in space.items():
        optuna_dist = to_optuna(dist)
        raw: Any
        if isinstance(optuna_dist, CategoricalDistribution):
            raw = trial.suggest_categorical(field, optuna_dist.choices)  # type: ignore[arg-type]
        elif isinstance(optuna_dist, IntDistribution):
            raw = trial.suggest_int(field, optuna_dist.low, optuna_dist.high, step=optuna_dist.step,
                                    log=optuna_dist.log)
        else:
            assert isinstance(optuna_dist, FloatDistribution)
            raw = trial.suggest_float(field, optuna_dist.low, optuna_dist.high, log=optuna_dist.log)
        values[field] = _decode(dist, raw)
    return values


def trial_values(trial: FrozenTrial, space: Mapping[str, DistributionSpec]) -> dict[str, Any]:
    """A stored trial's values (dotted field -> value as the spec takes it), e.g. the best trial's.

    Raises:
        KeyError: the trial has no value for a field of ``space`` (it was drawn from another space).
    """
    missing = [f for f in space if f not in trial.params]
    if missing:
        raise KeyError(f"trial {trial.number} has no value for {missing[0]}: the study was run with another "
                       "tuning.space")
    return {field: _decode(dist, trial.params[field]) for field, dist in space.items()}


def apply_values(spec: PipelineSpec, values: Mapping[str, Any], source: str = "tuning trial") -> PipelineSpec:
    """A copy of ``spec`` with a trial's values set (dotted field -> value), validated like a spec file.

    Raises:
        SpecError: a value the spec refuses (names the field).
    """
    data = spec.model_dump(mode="json")
    for field, value in values.items():
        set_field(data, field, value)
    return parse_spec(data, source)

