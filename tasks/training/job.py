"""The training job: the config a launcher hands to every worker process, and what the job produced.

A launcher writes :class:`TrainConfig` as ``train_config.json`` into the job's work folder and starts the
workers with ``python -m kiln.tasks.training --config train_config.json``; rank 0 writes the network
(:data:`kiln.tasks.training.networks.MODEL_FILE`) and ``train_metrics.json`` into ``output_dir``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kiln.tasks.features.splits import TRAIN_FILE
from kiln.tasks.features.transform import FEATURE_SPEC_FILE
from kiln.tasks.spec import ModelSpec, TaskType, TrainingSpec

#: The config file a launcher writes into its work folder for the workers.
CONFIG_FILE = "train_config.json"
#: Metrics file written next to the network in the output folder.
METRICS_FILE = "train_metrics.json"
#: The module the workers run (``python -m kiln.tasks.training``).
TRAIN_MODULE = "kiln.tasks.training"
_TASKS = ("classification", "regression")


#: The exit code of a rank that was asked to stop (SIGTERM) and did: it saved the checkpoint it was asked for, and
#: the job resumes from it (``EX_TEMPFAIL``: try again later). Launchers stop a job this way in
#: :meth:`kiln.tasks.launch.base.Launcher.preempt`.
PREEMPTED_EXIT_CODE = 75


#: Starts the machine-readable line of a reported metric: ``KILN_METRIC {"step": 3, "value": 0.91}``.
METRIC_LINE = "KILN_METRIC"


def parse_metric_line(line: str) -> tuple[int, float] | None:
    """The ``(step, value)`` of a :data:`METRIC_LINE` anywhere in an output line (launchers prefix lines with the
    node or rank), or ``None`` for any other line."""
    at = line.find(METRIC_LINE + " {")
    if at < 0:
        return None
    try:
        data = json.loads(line[at + len(METRIC_LINE) + 1:].strip())
        return int(data["step"]), float(data["value"])
    except (ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training job needs; serialised to JSON for the worker processes."""

    features_dir: str
    """Folder written by ``build_features``: ``train/val.parquet`` (columns ``f0..f{d-1}``, ``target``) and
    ``feature_spec.json``."""
    output_dir: str
    """Where rank 0 writes ``model.pt`` and ``train_metrics.json`` at the end."""
    checkpoint_dir: str
    """Per-epoch checkpoints; must persist across task retries and belong to this one job."""
    task: TaskType
    """``classification`` or ``regression``; must match the features folder."""
    model: ModelSpec
    """The network to build (``kiln.tasks.training.networks.build_model``)."""
    training: TrainingSpec
    """Epochs, per-rank batch size, optimizer, seed, threads per rank, timeout and log interval."""
    mlflow_tracking_uri: str | None = None
    """MLflow tracking URI for ``mlflow_run_id``; ``None`` uses MLflow's default."""
    mlflow_run_id: str | None = None
    """An existing MLflow run to log params and per-epoch metrics to; ``None`` logs nothing to MLflow."""
    fence_token: str | None = None
    """The try's claim on ``checkpoint_dir`` (:mod:`kiln.tasks.training.fence`): checkpoints and MLflow logging
    stop once a newer try claimed the folder. ``None``: unfenced (a job run by hand)."""
    code_dir: str | None = None
    """The pipeline's code folder (``code.path``) as the workers see it: put on ``sys.path`` for ``model.factory``
    and ``training.entrypoint``. A launcher may rewrite it (``/opt/kiln/user_code`` in a user image)."""
    code_hash: str | None = None
    """sha256 of the code folder's files (:func:`kiln.tasks.training.user_code.code_hash`), computed where the
    folder is first seen; part of the checkpoint fingerprint, so changed code never resumes old checkpoints."""
    raw_snapshot: str | None = None
    """The ingest snapshot (parquet) of the run, for loops that build their own features; ``None``: not given."""
    requirements: tuple[str, ...] = ()
    """The code's extra Python requirements (``code.requirements``, PEP 508 lines): installed into the user
    training image by the ``docker`` launcher, checked against the installed packages by ``local``."""
    report_metric: str | None = None
    """A metric whose every value rank 0 also prints as a :data:`METRIC_LINE` line (a tuning trial's objective: the
    task reads them from the job's output to prune the trial); ``None``: none."""

    def __post_init__(self) -> None:
        # A tuple, so the frozen config stays hashable; JSON and callers give a list.
        object.__setattr__(self, "requirements", tuple(self.requirements))
        if self.task not in _TASKS:
            raise ValueError(f"TrainConfig.task must be one of {', '.join(_TASKS)}, found {self.task!r}")
        if not isinstance(self.model, ModelSpec) or not isinstance(self.training, TrainingSpec):
            raise TypeError("TrainConfig.model must be a ModelSpec and TrainConfig.training a TrainingSpec")
        for name in ("features_dir", "output_dir", "checkpoint_dir"):
            if not getattr(self, name):
                raise ValueError(f"TrainConfig.{name} must be a non-empty path")

    @property
    def entrypoint(self) -> str | None:
        """The user's training loop (``training.entrypoint``); ``None``: kiln's own loop."""
        return self.training.entrypoint

    @property
    def params(self) -> dict[str, Any]:
        """The user's hyper-parameters (``training.params``)."""
        return dict(self.training.params)

    def to_json(self) -> str:
        """The config as JSON (pydantic fields dumped in JSON mode)."""
        data = {**asdict(self), "model": self.model.model_dump(mode="json"),
                "training": self.training.model_dump(mode="json")}
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        """Parse :meth:`to_json` output.

        Raises:
            ValueError, pydantic.ValidationError: malformed JSON or invalid fields.
        """
        data = json.loads(text)
        data["model"] = ModelSpec.model_validate(data["model"])
        data["training"] = TrainingSpec.model_validate(data["training"])
        return cls(**data)

    def fingerprint(self) -> str:
        """sha256 of everything a checkpoint must share with this config to be resumed from.

        Reads the train split and feature spec to hash them (and the code folder, when ``code_hash`` is not
        given). Covers the model (factory and options included), the user's loop and params and the code. Leaves
        out ``epochs`` (so a finished job can be extended), paths, MLflow ids and the number of ranks (a job may
        resume on another ``nproc``: it then continues correctly but not bit-identically, since the global batch
        and RNG streams change).
        """
        from kiln.tasks.training.user_code import code_hash

        t = self.training
        data_hash = hashlib.sha256()
        for name in (TRAIN_FILE, FEATURE_SPEC_FILE):
            with open(Path(self.features_dir) / name, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    data_hash.update(chunk)
        identity = {"model": self.model.model_dump(mode="json"), "task": self.task, "optimizer": t.optimizer,
                    "learning_rate": t.learning_rate, "weight_decay": t.weight_decay, "batch_size": t.batch_size,
                    "seed": t.seed, "data": data_hash.hexdigest(), "entrypoint": t.entrypoint, "params": t.params}
        if t.entrypoint or self.model.type == "custom":
            # Only code that runs: a code folder next to a built-in model and loop does not change the weights.
            identity["code"] = self.code_hash or (code_hash(self.code_dir) if self.code_dir else None)
            identity["requirements"] = list(self.requirements)
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class TrainJobResult:
    """What a training job produced (the same on every rank)."""

    epochs_run: int
    """Epochs the saved model has been trained for in total, resumed epochs included."""
    resumed_from_epoch: int | None
    """The checkpoint epoch this run continued from; ``None`` for a fresh start."""
    metrics: dict[str, float]
    """The last epoch's metrics (``train/loss``, ``val/loss``, ``val/accuracy`` or ``val/rmse``)."""
    samples_per_s: float | None
    """Global training throughput of this run's epochs (all ranks, training loop only); ``None`` if none ran."""
    model_file: str
    world_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
