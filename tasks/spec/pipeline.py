"""The whole spec (:class:`PipelineSpec`: its sections and the checks across them), the trigger-time Params that
may override its fields, and the validation of a parsed mapping into it with one message per bad field."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from kiln.tasks.spec.base import (
    CLASSIFICATION_METRICS,
    REGRESSION_METRICS,
    ColumnType,
    SpecError,
    TaskType,
    _Strict,
    metric_problem,
    set_field,
    unknown_key,
)
from kiln.tasks.spec.data import CacheSpec, CleaningSpec, ExpectationsSpec, FeaturesSpec, SourceSpec
from kiln.tasks.spec.monitoring import MonitoringSpec, check_cron
from kiln.tasks.spec.release import DeploymentSpec, EvaluationSpec
from kiln.tasks.spec.scoring import ScoringSpec
from kiln.tasks.spec.training import CodeSpec, ModelSpec, TrainingSpec
from kiln.tasks.spec.tuning import TuningSpec

#: Pipeline names that belong to the platform: its DAGs (``dags/kiln_*.py``: ``kiln_champion``; the DAG files
#: ``kiln_pipelines`` and ``kiln_spec_errors``) and any it adds later, matched case-insensitively.
RESERVED_PREFIX = "kiln_"


class PipelineSpec(_Strict):
    """A whole pipeline: one DAG is made from each spec file."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,99}$")
    """The DAG id and MLflow experiment name."""
    description: str = ""
    """Markdown shown as the DAG's documentation."""
    owner: str = "ml-platform"
    team: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,58}$")
    """The team whose operators may see and trigger this pipeline (the prod profile's Airflow role
    ``team:<team>``; admins and viewers see every pipeline). Default: ``owner``."""
    tags: list[str] = Field(default_factory=list)
    schedule: str | None = None
    """A cron expression (``0 3 * * *``, UTC) or preset (``@daily``); runs start at its times, with no catch-up of
    times missed while the pipeline was paused or the scheduler down. None: no timed runs."""
    asset: str | None = None
    """URI of the Airflow Asset that stands for this pipeline's input data (``s3://bucket/raw/penguins/``,
    ``file:///data/penguins.csv``, ``kiln://penguins/raw``): each event on it (posted to the REST API when new data
    lands, or emitted by an upstream DAG) starts a run. With ``schedule`` as well, either starts one."""
    source: SourceSpec
    target: str = Field(min_length=1)
    task: TaskType
    columns: dict[str, ColumnType] = Field(default_factory=dict)
    """Optional column types; others are inferred (numbers are numeric, everything else categorical)."""
    sample_fraction: float = Field(default=1.0, gt=0, le=1, title="Sample fraction")
    """Share of source rows kept at ingest (seeded), for quick runs on large data."""
    expectations: ExpectationsSpec = ExpectationsSpec()
    cleaning: CleaningSpec = CleaningSpec()
    features: FeaturesSpec = FeaturesSpec()
    model: ModelSpec = ModelSpec()
    training: TrainingSpec = TrainingSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    deployment: DeploymentSpec = DeploymentSpec()
    cache: CacheSpec = CacheSpec()
    """The step cache (README "Step cache")."""
    code: CodeSpec = CodeSpec()
    """The pipeline's own code (``model.type: custom``, ``training.entrypoint``) and its requirements."""
    monitoring: MonitoringSpec | None = None
    """Watch the served model (README "Monitoring"): a ``<name>_monitor`` DAG judges its captured traffic for
    drift and quality, and alerts or requests a retrain. None: no monitor."""
    scoring: ScoringSpec = ScoringSpec()
    """Batch scoring (README "Batch scoring"): the ``<name>_score`` DAG scores a dataset with the champion or a
    named version, partition by partition."""
    tuning: TuningSpec | None = None
    """Search hyper-parameters (README "Tuning"): an Optuna study of ``tuning.trials`` trainings over
    ``tuning.space``, stored in the lease store's database; the best trial's model continues to evaluate. None:
    one training with the spec's values."""

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        lower = value.lower()
        if lower == RESERVED_PREFIX.rstrip("_") or lower.startswith(RESERVED_PREFIX):
            raise ValueError(f"'{value}' is reserved: 'kiln' and names starting with '{RESERVED_PREFIX}' are the "
                             "platform's DAG ids (kiln_champion, ...; a pipeline of that name would replace one); "
                             f"rename the pipeline, e.g. '{value[len(RESERVED_PREFIX):] or 'my_pipeline'}_model'")
        return value

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return check_cron(value)

    @field_validator("asset")
    @classmethod
    def _asset_uri(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme, sep, rest = value.partition("://")
        if not sep or not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme) or not rest or any(c.isspace() for c in value):
            raise ValueError(f"{value!r} is not a URI: write scheme://location, e.g. s3://bucket/raw/ or "
                             "kiln://penguins/raw")
        if scheme == "airflow":
            raise ValueError("the 'airflow' URI scheme is reserved by Airflow; use another, e.g. kiln://")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineSpec:
        if self.columns.get(self.target) == "ignore":
            raise ValueError(f"the target column '{self.target}' cannot have type 'ignore'")
        if self.scoring.id_column == self.target:
            raise ValueError(f"scoring.id_column '{self.target}' is the target: name a column that identifies rows")
        slice_metrics = [m for s in self.evaluation.gate.slices for m in s.thresholds]
        problem = metric_problem(self.task, [*self.evaluation.thresholds, *slice_metrics,
                                             *([self.evaluation.primary_metric] if self.evaluation.primary_metric
                                               else [])])
        if problem:
            raise ValueError(problem)
        problem = self._asset_problem()
        if problem:
            raise ValueError(problem)
        if self.monitoring is not None and self.monitoring.quality.metric is not None:
            problem = metric_problem(self.task, [self.monitoring.quality.metric])
            if problem:
                raise ValueError(f"monitoring.quality.metric: {problem}")
        problem = self.tuning.problem(self) if self.tuning is not None else None
        if problem:
            raise ValueError(problem)
        for field, ref in (("model.factory", self.model.factory), ("training.entrypoint", self.training.entrypoint)):
            if ref and ref.split(":")[0].endswith(".py") and self.code.path is None:
                raise ValueError(f"{field} '{ref}' names a file, but the pipeline has no code folder: set code.path "
                                 "(relative to the spec file) or put the code in a folder named as the pipeline "
                                 "beside the spec")
        return self

    def _asset_problem(self) -> str | None:
        """An Asset on a data URI (s3://, file://) must be the source, so that the run it starts reads that data."""
        if self.asset is None:
            return None
        scheme = self.asset.partition("://")[0]
        if self.source.watch is not None and self.asset.rstrip("/") != self.source.asset_uri(self.name).rstrip("/"):
            return (f"asset '{self.asset}' is not the watched source '{self.source.asset_uri(self.name)}': with "
                    "source.watch the source is the Asset; remove asset")
        source_uri = (self.source.uri or "").rstrip("/")
        if scheme in ("s3", "file") and self.asset.rstrip("/") != source_uri:
            return (f"asset '{self.asset}' names data that the pipeline does not read (source is "
                    f"'{self.source.uri or self.source.asset_uri(self.name)}'); a run started by it would read other "
                    "data: make source.uri that URI, or use a kiln:// asset for an abstract signal")
        return None

    def asset_uri(self) -> str | None:
        """The URI of the DAG's Asset: the watched source, else ``asset``, else None."""
        if self.source.watch is not None:
            return self.source.asset_uri(self.name)
        return self.asset

    def metric_names(self) -> tuple[str, ...]:
        """The metrics ``evaluate`` computes for this spec's task."""
        return CLASSIFICATION_METRICS if self.task == "classification" else REGRESSION_METRICS

    @property
    def primary_metric(self) -> str:
        """The metric models are compared on."""
        return self.evaluation.primary_metric or ("accuracy" if self.task == "classification" else "rmse")

    @property
    def quality_metric(self) -> str:
        """The metric the monitor compares live: ``monitoring.quality.metric``, else the primary metric."""
        metric = self.monitoring.quality.metric if self.monitoring is not None else None
        return metric or self.primary_metric

    def retrain_asset_uri(self) -> str | None:
        """The Asset a monitor's retrain request emits and this pipeline's DAG is scheduled on (``kiln://<name>/
        retrain``), or None when no monitor retrains it."""
        if self.monitoring is None or self.monitoring.on_breach != "retrain":
            return None
        return f"kiln://{self.name}/retrain"

    def scores_asset_uri(self) -> str:
        """The Asset each committed run of the scoring DAG emits (``kiln://<name>/scores``; the event's extra names
        the run's manifest)."""
        return f"kiln://{self.name}/scores"

    @property
    def access_team(self) -> str:
        """``team``, or ``owner`` where the spec names no team."""
        return self.team or self.owner

    def spec_hash(self) -> str:
        """sha256 of the canonical JSON form: two specs that mean the same have the same hash."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def with_overrides(self, overrides: dict[str, Any], source: str = "trigger params") -> PipelineSpec:
        """A copy with trigger-time Params applied (keys of ``PARAM_FIELDS``; ``None`` values are ignored).

        Raises:
            SpecError: an unknown key or a value the spec would reject.
        """
        data = self.model_dump(mode="json")
        problems = []
        for key, value in overrides.items():
            if key not in PARAM_FIELDS:
                problems.append(unknown_key(key, list(PARAM_FIELDS)))
                continue
            if value is None:
                continue
            if PARAM_FIELDS[key][0] == "tuning" and self.tuning is None:
                problems.append(f"Param '{key}': pipeline {self.name!r} has no tuning section, so it runs no study; "
                                "leave the Param out, or add tuning: to its spec")
                continue
            if key == "tuning_parallel" and type(value) is int and self.tuning is not None and \
                    value > self.tuning.parallel:
                problems.append(f"Param 'tuning_parallel': {value} trials at once is more than the spec's "
                                f"tuning.parallel ({self.tuning.parallel}), the most its DAG runs at once; ask for "
                                f"at most {self.tuning.parallel}, or raise tuning.parallel in the spec")
                continue
            set_field(data, ".".join(PARAM_FIELDS[key]), value)
        if self.tuning is not None and overrides.get("tuning_parallel") is None:
            trials = data["tuning"]["trials"]
            if type(trials) is int and 1 <= trials < data["tuning"]["parallel"]:
                set_field(data, "tuning.parallel", trials)  # fewer trials than the spec runs at once: all at once
        if problems:
            raise SpecError(source, problems)
        try:
            return parse_spec(data, source)
        except SpecError as exc:  # name the Param the trigger gave, not only the spec field it overrides
            params = {".".join(PARAM_FIELDS[k]): k for k in overrides if k in PARAM_FIELDS}
            raise SpecError(source, [_with_param(p, params) for p in exc.problems]) from None


#: Trigger-time Params and the spec field each one overrides.
PARAM_FIELDS: dict[str, tuple[str, ...]] = {
    "epochs": ("training", "epochs"),
    "learning_rate": ("training", "learning_rate"),
    "batch_size": ("training", "batch_size"),
    "seed": ("training", "seed"),
    "nproc": ("training", "nproc"),
    "nodes": ("training", "nodes"),
    "launcher": ("training", "launcher"),
    "sample_fraction": ("sample_fraction",),
    "deployment": ("deployment", "strategy"),
    "use_cache": ("cache", "enabled"),
    # Tuned pipelines only (the form of a spec without ``tuning:`` does not show them). Airflow caps a mapped task's
    # concurrency when it parses the DAG, at the spec's ``parallel``; a run's fewer trials at once are held to by
    # the lease store (the trials' leases share a cap), the others waiting deferred.
    "tuning_trials": ("tuning", "trials"),
    "tuning_parallel": ("tuning", "parallel"),
}


def _with_param(problem: str, params: dict[str, str]) -> str:
    """``problem`` with the Param named after its field (``field 'training.seed' (Param 'seed'): ...``)."""
    for field, param in params.items():
        head = f"field '{field}':"
        if problem.startswith(head):
            return f"field '{field}' (Param '{param}'):{problem[len(head):]}"
    return problem


def _allowed_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names allowed at ``loc`` (the location of an unknown key's parent)."""
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return []
        ann = fields[part].annotation
        # dict[str, Model] and Model | None: find the model class inside.
        candidates = [ann, *getattr(ann, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return []
    return list(current.model_fields) if current is not None else []


def _format_error(err: Any) -> str:
    loc = tuple(err["loc"])
    field = ".".join(str(p) for p in loc) or "<top level>"
    if err["type"] == "extra_forbidden":
        parent = tuple(p for p in loc[:-1] if isinstance(p, str))
        allowed = _allowed_fields(PipelineSpec, parent)
        return f"field '{field}': " + unknown_key(str(loc[-1]), allowed)
    if err["type"] == "missing":
        return f"field '{field}': required but missing"
    msg = err["msg"].removeprefix("Value error, ")
    if isinstance(err.get("input"), dict):  # a cross-field check on a section: its message names the fields
        return f"field '{field}': {msg}"
    found = json.dumps(err.get("input"), default=str)
    if len(found) > 80:
        found = found[:77] + "..."
    return f"field '{field}': {msg} (found {found})"


def parse_spec(data: Any, source: str) -> PipelineSpec:
    """Validate an already-parsed mapping.

    Raises:
        SpecError: listing every invalid field.
    """
    if not isinstance(data, dict):
        raise SpecError(source, [f"the spec must be a mapping of fields, found {type(data).__name__}"])
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(source, [_format_error(e) for e in exc.errors()]) from None
