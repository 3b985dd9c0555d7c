"""Pipeline spec: the one declarative file a user writes to add a pipeline for a tabular dataset.

A spec is YAML, validated on load into frozen pydantic models. Every error names the file, the field, what was
found and what is allowed, so that a typo never surfaces later as a confusing failure inside a step.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

TaskType = Literal["classification", "regression"]
ColumnType = Literal["numeric", "categorical", "ignore"]

CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "roc_auc", "log_loss")
REGRESSION_METRICS = ("rmse", "mae", "r2")
#: Metrics where a larger value is better; the gate compares in this direction.
HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "roc_auc": True, "log_loss": False,
                    "rmse": False, "mae": False, "r2": True}


class SpecError(ValueError):
    """A spec file (or a trigger-time override) is invalid. ``problems`` holds one line per bad field."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid pipeline spec {source}:\n{lines}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpec(_Strict):
    """Where the raw data comes from."""

    uri: str = Field(min_length=1)
    """A path (relative to the spec file), ``file://`` URI, or ``pkg://<package>/<resource>`` for data that an
    installed Python package ships."""
    format: Literal["csv", "parquet"] | None = None
    """File format; inferred from the extension (``.csv``, ``.csv.gz``, ``.parquet``) when left out."""
    header: bool = True
    """CSV only: whether the first line names the columns. Without a header, columns are named by
    ``column_names`` or ``col_0``, ``col_1``, ..."""
    column_names: list[str] | None = None
    """CSV only: names for the columns of a header-less file."""

    def resolved_format(self) -> Literal["csv", "parquet"]:
        """The declared format, or the one the URI's extension implies."""
        if self.format:
            return self.format
        lower = self.uri.lower()
        if lower.endswith((".parquet", ".pq")):
            return "parquet"
        return "csv"


class ExpectationSpec(_Strict):
    """One Great Expectations expectation, by its snake_case name, e.g. ``expect_column_values_to_be_between``."""

    type: str = Field(pattern=r"^expect_[a-z0-9_]+$")
    kwargs: dict[str, Any] = Field(default_factory=dict)


class ExpectationsSpec(_Strict):
    """Data quality rules checked by the ``validate`` step."""

    infer_defaults: bool = True
    """Add defaults from the schema: declared columns exist, the target is never null, no column is entirely
    null, numeric columns hold numbers, and the table has at least ``min_rows`` rows."""
    min_rows: int = Field(default=10, ge=1)
    """The fewest rows a source may have."""
    declared: list[ExpectationSpec] = Field(default_factory=list)
    """Extra expectations, checked as written."""


class ColumnCleaning(_Strict):
    """How the ``clean`` step treats one column."""

    missing: Literal["drop_row", "mean", "median", "mode", "constant", "keep"] | None = None
    """What to do with missing values; the default is ``median`` for numeric and ``constant`` for categorical."""
    fill_value: str | float | None = None
    """The value used by ``missing: constant``."""
    outliers: Literal["none", "clip_iqr", "drop_iqr"] = "none"
    """Numeric only: clip to, or drop rows outside, ``[Q1 - k*IQR, Q3 + k*IQR]``."""
    iqr_factor: float = Field(default=1.5, gt=0)
    """The ``k`` of the outlier rule."""


class CleaningSpec(_Strict):
    """The ``clean`` step's policy."""

    drop_duplicates: bool = True
    """Drop rows that repeat an earlier row in every column."""
    default_numeric: ColumnCleaning = ColumnCleaning(missing="median")
    """Policy for numeric columns not listed under ``columns``."""
    default_categorical: ColumnCleaning = ColumnCleaning(missing="constant", fill_value="__missing__")
    """Policy for categorical columns not listed under ``columns``."""
    columns: dict[str, ColumnCleaning] = Field(default_factory=dict)
    """Per-column policies; rows with a missing target are always dropped."""


class FeaturesSpec(_Strict):
    """The ``build_features`` step's settings."""

    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    val_fraction: float = Field(default=0.1, ge=0, lt=1)
    scaling: Literal["standard", "minmax", "none"] = "standard"
    """How numeric columns are scaled; statistics come from the train split only."""
    max_categories: int = Field(default=50, ge=1)
    """Per categorical column, the most frequent values kept; the rest map to the unknown bucket."""

    @model_validator(mode="after")
    def _fractions_leave_train_rows(self) -> FeaturesSpec:
        if self.test_fraction + self.val_fraction >= 0.9:
            raise ValueError("test_fraction + val_fraction must be below 0.9 so that a train split remains")
        return self


class ModelSpec(_Strict):
    """The network trained by the ``train`` step."""

    type: Literal["mlp", "cnn"] = "mlp"
    """``mlp`` for tabular features; ``cnn`` for small images whose pixels are the feature columns in order."""
    hidden_sizes: list[int] = Field(default_factory=lambda: [64, 32])
    """MLP hidden layer widths (CNN: width of the dense layer after the convolutions, first entry)."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    image_shape: tuple[int, int] | None = None
    """CNN only: height and width of the image; height*width must equal the number of feature columns."""
    channels: list[int] = Field(default_factory=lambda: [16, 32])
    """CNN only: output channels of each 3x3 convolution."""

    @field_validator("hidden_sizes", "channels")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(x < 1 for x in v):
            raise ValueError("must be a non-empty list of positive integers")
        return v

    @model_validator(mode="after")
    def _cnn_needs_shape(self) -> ModelSpec:
        if self.type == "cnn" and self.image_shape is None:
            raise ValueError("model.type 'cnn' needs image_shape: [height, width]")
        return self


class ResourcesSpec(_Strict):
    """What the ``train`` step leases from a resource pool, per node, before it starts any worker."""

    pool: str = "local"
    """A pool of the inventory (``KILN_POOLS_FILE``); ``local`` is this machine when no inventory is given."""
    team: str = "default"
    """The team (tenant) whose quota the lease counts against."""
    priority: int | None = None
    """Queue priority, higher first; default: the team's priority."""
    gpus: int = Field(default=0, ge=0, le=64)
    """GPUs per node (``CUDA_VISIBLE_DEVICES`` / Docker device requests carry the leased ids)."""
    gpu_memory_min: str | int = 0
    """Least memory each GPU must have, e.g. ``20GiB`` (0: any)."""
    cpus: int | None = Field(default=None, ge=1, le=1024)
    """CPU cores per node, leased as a cpuset; default ``nproc * threads_per_proc``."""
    memory: str | int = "4GiB"
    """Memory per node, e.g. ``16GiB``: the containers' limit."""
    placement: Literal["pack", "spread"] | None = None
    """Where the gang's nodes go: ``pack`` fills busy nodes first, ``spread`` prefers idle ones; default: the pool's."""
    wait_timeout_s: int = Field(default=3600, ge=1)
    """The task fails if the lease is not granted within this time (it waits in the triggerer, not a worker)."""
    ttl_s: int = Field(default=60, ge=5)
    """The lease is reclaimed this long after its holder stops heartbeating (a killed worker frees its devices)."""
    preemptible: bool = False
    """The job checkpoints, so a higher-priority request may preempt it; it then fails for retry and resumes."""

    @field_validator("gpu_memory_min", "memory")
    @classmethod
    def _size(cls, v: str | int) -> str | int:
        from kiln.tasks.pools.allocation import parse_size

        parse_size(v, field_name="size")
        return v


class DockerSpec(_Strict):
    """Container settings of the ``docker`` launcher."""

    image: str | None = None
    """The training image; default ``KILN_TRAIN_IMAGE`` (``make image`` builds ``kiln-train:cpu``)."""
    shm_size: str = "1g"
    """``/dev/shm`` size: DataLoader workers and NCCL need more than Docker's 64 MB."""
    ulimits: dict[str, tuple[int, int]] = Field(default_factory=dict)
    """``{name: [soft, hard]}``, e.g. ``{memlock: [-1, -1]}`` on GPU hosts. Raising a limit above the host's hard
    limit needs CAP_SYS_RESOURCE in the daemon; without it the container cannot start and the job fails at once."""
    network: Literal["bridge", "host"] = "bridge"
    """``bridge``: a private network per job (nodes on one Docker host); ``host``: the node's network, required
    when the gang spans several Docker hosts (NCCL/gloo connect to the nodes' addresses)."""


class TrainingSpec(_Strict):
    """The ``train`` step's settings. The fields in ``PARAM_FIELDS`` can be overridden when a run is triggered."""

    epochs: int = Field(default=10, ge=1, le=10_000)
    batch_size: int = Field(default=32, ge=1, le=65_536)
    """Per-process batch size."""
    learning_rate: float = Field(default=1e-3, gt=0, le=10)
    weight_decay: float = Field(default=0.0, ge=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    seed: int = Field(default=42, ge=0)
    nproc: int = Field(default=2, ge=1, le=64)
    """Worker processes (DDP ranks) on the node."""
    threads_per_proc: int = Field(default=1, ge=1, le=64)
    """torch intra-op threads per rank."""
    launcher: Literal["local", "docker"] = "local"
    """How workers are started: ``local`` runs torchrun on this machine; ``docker`` runs one container per node,
    each running torchrun (gloo on CPU, NCCL on GPUs). Same checkpoints, metrics and outputs either way."""
    nodes: int = Field(default=1, ge=1, le=256)
    """Nodes in the gang (``nproc`` ranks on each); more than one needs the ``docker`` launcher."""
    max_restarts: int = Field(default=0, ge=0, le=100)
    """Times the whole gang is restarted after a failure, resuming from the last complete checkpoint."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    docker: DockerSpec = Field(default_factory=DockerSpec)
    timeout_s: int = Field(default=1800, ge=10)
    """The whole training job fails if it runs longer than this (a hung peer cannot block a worker forever)."""
    log_every_steps: int = Field(default=20, ge=1)

    @model_validator(mode="after")
    def _local_is_one_node(self) -> TrainingSpec:
        if self.launcher == "local" and self.nodes > 1:
            raise ValueError(f"training.nodes is {self.nodes} but launcher 'local' runs on one node: "
                             "set training.launcher: docker, or nodes: 1")
        if 0 < self.resources.gpus < self.nproc:
            raise ValueError(f"training.nproc is {self.nproc} but training.resources.gpus is {self.resources.gpus}: "
                             "DDP runs one rank per GPU (NCCL cannot share one), so set nproc to at most the GPUs "
                             "leased per node")
        return self

    def lease_cpus(self) -> int:
        """CPU cores leased per node."""
        return self.resources.cpus or self.nproc * self.threads_per_proc


class SliceSpec(_Strict):
    """A per-slice check of the gate: the test rows are grouped by one raw column's values."""

    column: str = Field(min_length=1)
    """A raw input column (categorical or with few values); each value is a slice."""
    min_rows: int = Field(default=20, ge=1)
    """Slices with fewer test rows are reported as skipped, never failed (too few rows to judge)."""
    thresholds: dict[str, float] = Field(default_factory=dict)
    """Per-slice metric thresholds, in each metric's direction like ``evaluation.thresholds``."""
    max_regression: float | None = Field(default=None, ge=0)
    """On the primary metric: a slice may trail the champion's value on the same slice by at most this."""


class GateSpec(_Strict):
    """How the ``gate`` step compares a candidate with the thresholds and with the current champion."""

    margin: float = Field(default=0.0, ge=0)
    """The candidate may trail the champion on the primary metric by at most this (0: it must tie or beat it)."""
    method: Literal["point", "bootstrap"] = "point"
    """``point`` compares metrics on the test split; ``bootstrap`` compares one-sided confidence bounds from a
    paired bootstrap over the test rows (stricter on small test sets)."""
    bootstrap_samples: int = Field(default=1000, ge=100, le=100_000)
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    """One-sided confidence level of the bootstrap bounds."""
    slices: list[SliceSpec] = Field(default_factory=list)


class EvaluationSpec(_Strict):
    """The ``evaluate`` step's metrics and the thresholds the gate applies later."""

    primary_metric: str | None = None
    """The metric models are compared on; default ``accuracy`` (classification) or ``rmse`` (regression)."""
    thresholds: dict[str, float] = Field(default_factory=dict)
    """Minimum (or, for error metrics, maximum) values a candidate must reach, by metric name."""
    gate: GateSpec = Field(default_factory=GateSpec)


class CanarySpec(_Strict):
    """The ``canary`` deployment strategy: a share of live traffic goes to the candidate until it is judged."""

    share: float = Field(default=0.2, gt=0, lt=1)
    """Share of requests routed to the candidate."""
    min_requests: int = Field(default=50, ge=1)
    """Requests the candidate must serve before it can be promoted."""
    window_s: float = Field(default=300, gt=0)
    """The candidate is rolled back if it has not served ``min_requests`` within this time."""
    max_error_rate_increase: float = Field(default=0.01, ge=0, le=1)
    """Rolled back if its error rate exceeds the champion's by more than this."""
    max_latency_ratio: float = Field(default=2.0, ge=1)
    """Rolled back if its p99 latency exceeds the champion's by more than this factor."""


class InfraValidationSpec(_Strict):
    """The ``infra_validate`` step: the bundle is loaded in the serving runtime before it is deployed."""

    tolerance: float = Field(default=1e-5, gt=0)
    """Largest allowed difference between served and training-side predictions (train/serve parity)."""
    latency_budget_ms: float = Field(default=500.0, gt=0)
    """p99 latency of one-row requests allowed in the serving runtime. The default only catches a runtime that is
    broken-slow (seconds per row) on a busy laptop; set your service's objective here (the serving benchmark
    measures p99 of 8-13 ms on 2 cores)."""
    requests: int = Field(default=50, ge=1, le=10_000)
    """One-row requests replayed to time it."""


class DeploymentSpec(_Strict):
    """What happens after a candidate passes the gate."""

    strategy: Literal["direct", "canary", "none"] = "direct"
    """``direct`` swaps the served model at once; ``canary`` sends a share of traffic to the candidate and promotes
    or rolls it back on its error rate and latency; ``none`` moves the registry alias only (no endpoint)."""
    port: int | None = Field(default=None, ge=1, le=65_535)
    """Port of this pipeline's model server on the embedded default; default ``KILN_SERVE_PORT``. Pipelines that
    are served at the same time need different ports."""
    canary: CanarySpec = Field(default_factory=CanarySpec)
    infra_validation: InfraValidationSpec = Field(default_factory=InfraValidationSpec)


class PipelineSpec(_Strict):
    """A whole pipeline: one DAG is made from each spec file."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,99}$")
    """The DAG id and MLflow experiment name."""
    description: str = ""
    """Markdown shown as the DAG's documentation."""
    owner: str = "ml-platform"
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
    sample_fraction: float = Field(default=1.0, gt=0, le=1)
    """Fraction of source rows kept at ingest (seeded), for quick runs on large data."""
    expectations: ExpectationsSpec = ExpectationsSpec()
    cleaning: CleaningSpec = CleaningSpec()
    features: FeaturesSpec = FeaturesSpec()
    model: ModelSpec = ModelSpec()
    training: TrainingSpec = TrainingSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    deployment: DeploymentSpec = DeploymentSpec()

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        from croniter import croniter

        if value is not None and not croniter.is_valid(value):
            raise ValueError(f"{value!r} is not a cron expression ('minute hour day month weekday', e.g. '0 3 * * *') "
                             "or a preset (@hourly, @daily, @weekly, @monthly, @yearly)")
        return value

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
        allowed = self.metric_names()
        slice_metrics = [m for s in self.evaluation.gate.slices for m in s.thresholds]
        for name in [*self.evaluation.thresholds, *slice_metrics,
                     *([self.evaluation.primary_metric] if self.evaluation.primary_metric else [])]:
            if name not in allowed:
                raise ValueError(f"metric '{name}' is not computed for task '{self.task}'; "
                                 f"allowed: {', '.join(allowed)}")
        return self

    def metric_names(self) -> tuple[str, ...]:
        """The metrics ``evaluate`` computes for this spec's task."""
        return CLASSIFICATION_METRICS if self.task == "classification" else REGRESSION_METRICS

    @property
    def primary_metric(self) -> str:
        """The metric models are compared on."""
        return self.evaluation.primary_metric or ("accuracy" if self.task == "classification" else "rmse")

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
                problems.append(_unknown_key(key, list(PARAM_FIELDS)))
                continue
            if value is None:
                continue
            node = data
            *parents, leaf = PARAM_FIELDS[key]
            for p in parents:
                node = node[p]
            node[leaf] = value
        if problems:
            raise SpecError(source, problems)
        return parse_spec(data, source)


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
}


def _unknown_key(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown field '{key}'{hint} allowed: {', '.join(allowed)}"


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
        return f"field '{field}': " + _unknown_key(str(loc[-1]), allowed)
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


def load_spec(path: str | Path) -> PipelineSpec:
    """Read and validate a spec file. A relative ``source.uri`` is resolved against the file's folder.

    Raises:
        SpecError: unreadable file, bad YAML, or invalid fields; the message names the file and each field.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SpecError(str(path), [f"cannot read the file: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        raise SpecError(str(path), [f"not valid YAML: {exc}"]) from None
    if isinstance(data, dict) and isinstance(data.get("source"), dict):
        uri = data["source"].get("uri")
        if isinstance(uri, str) and "://" not in uri and not Path(uri).is_absolute():
            data["source"] = {**data["source"], "uri": str((path.parent / uri).resolve())}
    return parse_spec(data, str(path))


def discover_specs(folder: str | Path) -> list[Path]:
    """Spec files in ``folder`` (``*.yaml`` / ``*.yml``), sorted; files starting with ``_`` or ``.`` are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.suffix in (".yaml", ".yml") and not p.name.startswith(("_", ".")))


def load_specs(folder: str | Path) -> tuple[list[tuple[Path, PipelineSpec]], list[SpecError]]:
    """Load every spec in ``folder``: the valid ones, and one error per invalid file (never raises for a file).

    Two files declaring the same ``name`` make the later one (by file name) an error.
    """
    valid: list[tuple[Path, PipelineSpec]] = []
    errors: list[SpecError] = []
    seen: dict[str, Path] = {}
    for path in discover_specs(folder):
        try:
            spec = load_spec(path)
        except SpecError as exc:
            errors.append(exc)
            continue
        if spec.name in seen:
            errors.append(SpecError(str(path), [f"field 'name': '{spec.name}' is already used by {seen[spec.name]}; "
                                                "each pipeline needs a unique name"]))
            continue
        seen[spec.name] = path
        valid.append((path, spec))
    return valid, errors
