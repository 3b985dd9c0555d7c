"""The ``tuning:`` section of a pipeline spec: a hyper-parameter search (an Optuna study) over the fields of
``training`` and ``model`` (README "Tuning").

The fields a trial may vary are read from the models (:class:`TrainingSpec`, :class:`ModelSpec`): every field but
those that say where or how a run executes rather than what it learns (:data:`NOT_TUNABLE`), plus the keys of the
pipeline's own settings (``training.params.<name>``, ``model.options.<name>``). A bound or choice is checked against
the spec it would produce (:meth:`TuningSpec.problem`, called by the whole spec's cross-checks), so a value the
target field refuses is refused at parse time, naming ``tuning.space.<field>``.
"""

from __future__ import annotations

import json
import re
import typing
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from kiln.tasks.spec.base import HIGHER_IS_BETTER, _Strict, set_field, unknown_key
from kiln.tasks.spec.training import ModelSpec, TrainingSpec

if TYPE_CHECKING:
    from kiln.tasks.spec.pipeline import PipelineSpec

Direction = Literal["maximize", "minimize"]
DistributionType = Literal["uniform", "log_uniform", "int", "categorical"]

#: The validation metrics kiln's own loop logs every epoch, per task (``kiln.tasks.training.loop._evaluate``;
#: a test checks the two agree), the task's natural objective first.
VAL_METRICS: dict[str, tuple[str, ...]] = {"classification": ("val/accuracy", "val/loss"),
                                           "regression": ("val/rmse", "val/loss")}
#: Fields of ``training``/``model`` a trial may not vary, and why.
NOT_TUNABLE: dict[str, str] = {
    "training.seed": "the study's seed (tuning.seed) seeds every trial; varying it measures noise",
    "training.nproc": "where a trial runs, not what it learns",
    "training.threads_per_proc": "where a trial runs, not what it learns",
    "training.launcher": "where a trial runs, not what it learns",
    "training.nodes": "where a trial runs, not what it learns",
    "training.resources": "every trial leases the same devices",
    "training.docker": "where a trial runs, not what it learns",
    "training.max_restarts": "how a run is supervised",
    "training.timeout_s": "how a run is supervised",
    "training.log_every_steps": "how a run is supervised",
    "training.entrypoint": "the code, not a setting of it",
    "training.params": "vary one key: training.params.<name>",
    "model.type": "the network's kind needs its own settings (image_shape, factory)",
    "model.factory": "the code, not a setting of it",
    "model.options": "vary one key: model.options.<name>",
    "model.image_shape": "the data's shape, not a setting",
}
#: Prefixes of the pipeline's own settings, whose keys a trial may vary (any JSON value the code takes).
SETTING_PREFIXES = ("training.params.", "model.options.")
_SECTIONS: dict[str, type[BaseModel]] = {"training": TrainingSpec, "model": ModelSpec}
_KEYS: dict[str, tuple[str, ...]] = {"uniform": ("low", "high"), "log_uniform": ("low", "high"),
                                     "int": ("low", "high", "step", "log"), "categorical": ("choices",)}
_CUSTOM_METRIC = re.compile(r"^val/[A-Za-z0-9_.-]{1,64}$")
MAX_CHOICES = 100


def tunable_fields() -> list[str]:
    """The ``training``/``model`` fields a search space may name (besides ``training.params.<name>`` and
    ``model.options.<name>``), in the models' order."""
    return [f"{section}.{name}" for section, model in _SECTIONS.items() for name in model.model_fields
            if f"{section}.{name}" not in NOT_TUNABLE]


def _allowed_types(field: str) -> tuple[str, ...]:
    """The distribution types that can produce a value of ``field``'s type."""
    if field.startswith(SETTING_PREFIXES):
        return typing.get_args(DistributionType)
    section, name = field.split(".", 1)
    annotation = _SECTIONS[section].model_fields[name].annotation
    if annotation is int:
        return ("int", "categorical")
    if annotation is float:
        return ("uniform", "log_uniform", "int", "categorical")
    return ("categorical",)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class DistributionSpec(_Strict):
    """One field's search range: ``{type: uniform|log_uniform, low, high}``, ``{type: int, low, high, step, log}``
    or ``{type: categorical, choices: [...]}``."""

    type: DistributionType
    """``uniform``/``log_uniform``: a real number in [low, high] (log: evenly over the orders of magnitude);
    ``int``: an integer in [low, high] by ``step``; ``categorical``: one of ``choices``."""
    low: float | int | None = None
    high: float | int | None = None
    step: int | None = Field(default=None, ge=1)
    """``int`` only: the spacing of the values (default 1); ``high - low`` must be a multiple of it."""
    log: bool | None = None
    """``int`` only: sample evenly over the orders of magnitude (low >= 1, step 1)."""
    choices: list[Any] | None = None
    """``categorical`` only: the values (numbers, strings, booleans, or lists such as hidden sizes)."""

    @model_validator(mode="before")
    @classmethod
    def _keys_of_type(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") in _KEYS:
            allowed = ["type", *_KEYS[data["type"]]]
            # A dumped spec (trigger overrides, a trial's spec) holds every key, those of other types as null.
            extra = [k for k, v in data.items() if k not in allowed and v is not None]
            if extra:
                raise ValueError(f"{unknown_key(str(extra[0]), allowed)} (for type '{data['type']}')")
            data = {k: v for k, v in data.items() if k in allowed}
        return data

    @model_validator(mode="after")
    def _range(self) -> DistributionSpec:
        if self.type == "categorical":
            return self._check_choices()
        if self.low is None or self.high is None:
            raise ValueError(f"type '{self.type}' needs low and high")
        if self.type == "int":
            if not isinstance(self.low, int) or not isinstance(self.high, int):
                raise ValueError(f"type 'int' needs integer bounds (found low {self.low!r}, high {self.high!r}); "
                                 "use type: uniform for real numbers")
            step = self.step or 1
            if self.log and (self.low < 1 or step != 1):
                raise ValueError("log: true needs low >= 1 and step 1 (values spaced evenly by orders of magnitude)")
            if (self.high - self.low) % step:
                raise ValueError(f"high - low ({self.high - self.low}) is not a multiple of step {step}; "
                                 f"e.g. high: {self.low + (self.high - self.low) // step * step}")
        if self.low >= self.high:
            kind = "empty" if self.low == self.high else "inverted"
            raise ValueError(f"the range [{self.low}, {self.high}] is {kind}: low must be below high")
        if self.type == "log_uniform" and self.low <= 0:
            raise ValueError(f"log_uniform needs low > 0 (found {self.low}); use type: uniform for a range from 0")
        return self

    def _check_choices(self) -> DistributionSpec:
        if not self.choices or len(self.choices) < 2:
            raise ValueError("categorical needs at least 2 choices (for one value, set the field itself)")
        if len(self.choices) > MAX_CHOICES:
            raise ValueError(f"categorical takes at most {MAX_CHOICES} choices, found {len(self.choices)}")
        keys = [json.dumps(c, sort_keys=True) for c in self.choices]
        if len(set(keys)) < len(keys):
            raise ValueError(f"choice {next(c for c in keys if keys.count(c) > 1)} is given twice")
        return self

    def values_to_check(self) -> list[tuple[str, Any]]:
        """The values whose validity makes the whole range valid: the bounds, or each choice."""
        if self.type == "categorical":
            return [(f"choice {json.dumps(c)}", c) for c in self.choices or []]
        return [("low", self.low), ("high", self.high)]


class ObjectiveSpec(_Strict):
    """What a trial is judged by: a validation metric the training loop logs every epoch."""

    metric: str | None = None
    """The metric (``val/accuracy`` or ``val/loss`` for classification, ``val/rmse`` or ``val/loss`` for
    regression; with the pipeline's own loop, any ``val/<name>`` it logs). Default: ``val/accuracy``, ``val/rmse``."""
    direction: Direction | None = None
    """``maximize`` or ``minimize``; default: the metric's (required for a metric of the pipeline's own loop that
    kiln does not know)."""


class TuningSpec(_Strict):
    """A hyper-parameter search: each trial trains the pipeline with values drawn from ``space``; the best trial's
    model continues to evaluate, register and the gate."""

    space: dict[str, DistributionSpec]
    """Per field (``training.learning_rate``, ``model.hidden_sizes``, ``training.params.<name>``, ...), the range
    its trials draw from."""
    objective: ObjectiveSpec = ObjectiveSpec()
    """The per-epoch validation metric the trials are compared (and pruned) on, and its direction."""
    trials: int = Field(default=20, ge=1, le=1000)
    """Trials in the study (a restarted run continues it; failed trials count)."""
    parallel: int = Field(default=2, ge=1)
    """Trials trained at once (at most ``trials``; default 2, or ``trials`` when fewer)."""
    sampler: Literal["tpe", "random"] = "tpe"
    """How values are drawn: ``tpe`` (Optuna's TPE, guided by the finished trials) or ``random``."""
    pruner: Literal["median", "hyperband", "none"] = "median"
    """Stopping unpromising trials at an epoch: ``median`` (worse than the median of finished trials at the same
    epoch), ``hyperband``, or ``none``."""
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    """Seeds the sampler; default: ``training.seed``."""

    @model_validator(mode="before")
    @classmethod
    def _parallel_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and "parallel" not in data and isinstance(data.get("trials"), int):
            data = {**data, "parallel": max(1, min(2, data["trials"]))}
        return data

    @field_validator("space")
    @classmethod
    def _fields(cls, value: dict[str, DistributionSpec]) -> dict[str, DistributionSpec]:
        if not value:
            raise ValueError("names no field: give at least one, e.g. training.learning_rate: "
                             "{type: log_uniform, low: 1.0e-4, high: 1.0e-1}")
        allowed = tunable_fields()
        for field, dist in value.items():
            if field.startswith(SETTING_PREFIXES):
                if not field.rsplit(".", 1)[1].isidentifier():
                    raise ValueError(f"'{field}': the key after '{field.rsplit('.', 1)[0]}.' must be a Python "
                                     "identifier")
            elif field in NOT_TUNABLE:
                raise ValueError(f"'{field}' cannot be tuned ({NOT_TUNABLE[field]}); tunable: {', '.join(allowed)}, "
                                 "training.params.<name>, model.options.<name>")
            elif field not in allowed:
                raise ValueError(f"{unknown_key(field, allowed)}, training.params.<name>, model.options.<name>")
            elif dist.type not in _allowed_types(field):
                raise ValueError(f"'{field}' takes type {' or '.join(_allowed_types(field))} (found '{dist.type}')")
        return value

    @model_validator(mode="after")
    def _parallel(self) -> TuningSpec:
        if self.parallel > self.trials:
            raise ValueError(f"tuning.parallel {self.parallel} is more than tuning.trials {self.trials}: set "
                             f"parallel to at most {self.trials}")
        return self

    def metric(self, spec: PipelineSpec) -> str:
        """The objective's metric: ``objective.metric``, else the task's natural one."""
        return self.objective.metric or VAL_METRICS[spec.task][0]

    def direction(self, spec: PipelineSpec) -> Direction:
        """The objective's direction: ``objective.direction``, else the metric's."""
        return self.objective.direction or _known_direction(self.metric(spec)) or "minimize"

    def study_seed(self, spec: PipelineSpec) -> int:
        """The sampler's seed: ``seed``, else ``training.seed``."""
        return self.seed if self.seed is not None else spec.training.seed

    def problem(self, spec: PipelineSpec) -> str | None:
        """What in this section ``spec`` (the whole spec holding it) cannot use, naming the field, or None."""
        return self._objective_problem(spec) or self._values_problem(spec)

    def _objective_problem(self, spec: PipelineSpec) -> str | None:
        metric, allowed = self.metric(spec), VAL_METRICS[spec.task]
        if metric not in allowed:
            if spec.training.entrypoint is None:
                return (f"tuning.objective.metric: '{metric}' is not logged for task '{spec.task}' by kiln's training "
                        f"loop; allowed: {', '.join(allowed)}")
            if not _CUSTOM_METRIC.match(metric):
                return (f"tuning.objective.metric: '{metric}' is not a validation metric; the pipeline's own loop "
                        f"must log it per epoch as 'val/<name>' (e.g. {', '.join(allowed)})")
        known = _known_direction(metric)
        if known is None and self.objective.direction is None:
            return (f"tuning.objective.direction: required for metric '{metric}' (kiln does not know whether higher "
                    "is better): give maximize or minimize")
        if known is not None and self.objective.direction not in (None, known):
            return (f"tuning.objective.direction: '{self.objective.direction}' would pick the worst trials by "
                    f"'{metric}' ({known} it); set {known}, or remove direction")
        return None

    def _values_problem(self, spec: PipelineSpec) -> str | None:
        base = spec.model_dump(mode="json")
        base["tuning"] = None  # the candidate's own tuning section is not checked again
        for field, dist in self.space.items():
            for what, value in dist.values_to_check():
                candidate = set_field(json.loads(json.dumps(base)), field, value)
                try:
                    type(spec).model_validate(candidate)
                except ValidationError as exc:
                    return f"tuning.space.{field}: {what} is refused by {field}: {_first_error(exc)}"
        return None


def _known_direction(metric: str) -> Direction | None:
    name = metric.removeprefix("val/")
    if name == "loss":
        return "minimize"
    if name in HIGHER_IS_BETTER:
        return "maximize" if HIGHER_IS_BETTER[name] else "minimize"
    return None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{msg} (at {where})" if where else msg
