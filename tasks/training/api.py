"""kiln's training API (version :data:`API_VERSION`): what the platform gives a training loop and what it takes back.

A training loop is one function, ``def train(ctx: TrainContext) -> TrainedModel``: kiln's own loop
(:mod:`kiln.tasks.training.loop`) or the pipeline's (``training.entrypoint``). kiln starts it on every rank of the
job (torchrun, the Docker gang, or one plain process) with the process group already initialised, and after it
returns exports the model (rank 0). The loop reaches the platform only through the context:

- what the run is: ``hparams``/``params``, the features (``load_split``, a rank's ``load_shard``, ``features``) or
  the raw snapshot, the model the spec names (``build_model``), the rank layout and the device;
- ``load_checkpoint``/``save_checkpoint``: a retried task or a restarted gang resumes where the newest checkpoint
  left off, every rank's RNG streams included, so a resumed run ends with the weights of an uninterrupted one;
- ``log_metrics``/``log``: the run's MLflow run and the task log (rank 0);
- ``stop_requested``/:class:`JobPreemptedError`: a job asked to stop (SIGTERM: a preemption) stops at its next
  ``save_checkpoint``, on every rank, once that checkpoint is written.

The loop never imports Airflow or MLflow; it runs the same under any launcher.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from kiln.tasks.features.splits import load_shard as _read_shard
from kiln.tasks.features.splits import load_split as _read_split
from kiln.tasks.features.transform import FEATURE_SPEC_FILE
from kiln.tasks.storage.artifacts import atomic_write_bytes, read_json
from kiln.tasks.training import checkpoints, fence
from kiln.tasks.training.job import METRIC_LINE
from kiln.tasks.training.user_code import CategoricalSlice, FeatureLayout, build_custom_model

if TYPE_CHECKING:
    from kiln.tasks.spec import TaskType
    from kiln.tasks.training.job import TrainConfig

__all__ = ["API_VERSION", "CategoricalSlice", "Checkpoint", "FeatureLayout", "JobPreemptedError", "TrainContext",
           "TrainedModel"]

log = logging.getLogger(__name__)

#: The version of this API; a loop written for version 1 keeps working for as long as it is 1.
API_VERSION = 1
#: Written into the checkpoint folder when a job starts, so a retry knows an earlier try ran.
STARTED_FILE = "started"
#: Most ``log_metrics`` entries kept for ``train_metrics.json`` (MLflow gets every one).
MAX_HISTORY = 10_000
#: The ``training`` fields a loop sees in ``hparams`` (the others say where and how the job runs).
HPARAM_FIELDS = ("epochs", "batch_size", "learning_rate", "weight_decay", "optimizer", "seed", "log_every_steps")
_STREAM_STRIDE = 1009  # an epoch's offset of a rank's RNG seed, when RNG states cannot be restored

# A plain bool, not a threading.Event: Event.set() takes a lock, and a second SIGTERM (torchrun forwards the one the
# launcher sent to the ranks too) can run the handler again inside the first call, which would then deadlock.
_stop_requested = False


def request_stop(signum: int | None = None, frame: Any = None) -> None:
    """Ask this process's training loop to stop at its next checkpoint; the SIGTERM handler of a training process
    (it only sets a flag, which is safe in a signal handler)."""
    global _stop_requested
    _stop_requested = True


class JobPreemptedError(BaseException):
    """Raised on every rank by :meth:`TrainContext.save_checkpoint` once a rank was asked to stop (SIGTERM) and the
    checkpoint of ``epoch`` is written; let it propagate: the job exits with
    :data:`~kiln.tasks.training.job.PREEMPTED_EXIT_CODE` and its next run resumes from that checkpoint.

    A ``BaseException``, so that a loop's ``except Exception`` does not swallow it.
    """

    def __init__(self, epoch: int):
        self.epoch = epoch
        super().__init__(f"the job was asked to stop; checkpoint of epoch {epoch} saved")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint a loop saved with :meth:`TrainContext.save_checkpoint`."""

    epoch: int
    """The progress counter it was saved at (kiln's loop: the last complete epoch)."""
    state: dict[str, Any]
    """What the loop saved (e.g. ``model.state_dict()``, ``optimizer.state_dict()``), on CPU."""


@dataclass(frozen=True)
class TrainedModel:
    """What a loop hands back on rank 0: kiln checks, saves and exports it (other ranks may return anything)."""

    module: nn.Module
    """The trained network (a ``DistributedDataParallel`` wrapper is unwrapped): maps float32 features
    ``[n, input_dim]`` to ``[n, n_outputs]`` (logits per class, or one value)."""
    example_input: torch.Tensor
    """A few real feature rows ``[n, input_dim]`` (e.g. ``x_train[:8]``): the export traces and checks on them."""
    samples_per_s: float | None = None
    """Optional: the loop's global training throughput, reported in ``train_metrics.json``."""


@dataclass
class _Record:
    """What the job runner needs from the loop's calls (the context's side of them)."""

    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None
    last_epoch: int = 0
    load_called: bool = False
    params_logged: bool = False
    history_full: bool = False


# Collectives that degrade to local no-ops when there is no process group (a plain in-process run).
def broadcast(obj: Any) -> Any:
    """``obj`` from rank 0 on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class TrainContext:
    """What kiln gives a training loop; the same object on every rank (with that rank's values)."""

    rank: int
    """This process's rank, ``0..world_size-1``."""
    world_size: int
    """Processes in the job (``training.nodes * training.nproc``)."""
    local_rank: int
    """This process's index on its node (its GPU index when the job has GPUs)."""
    is_main: bool
    """Rank 0: the one that logs and whose returned model kiln exports."""
    distributed: bool
    """A process group is initialised (``torch.distributed``: NCCL on GPUs, gloo on CPU); wrap the model in
    ``DistributedDataParallel`` when true."""
    device: torch.device
    """This rank's device: ``cuda:<local_rank>`` when the lease gave GPUs, else ``cpu``."""
    task: TaskType
    """``classification`` or ``regression``."""
    input_dim: int
    """Width of the feature matrix."""
    n_outputs: int
    """Outputs the network must give per row: the number of classes, or 1."""
    classes: list[str] | None
    """Class labels in output order (classification), else ``None``."""
    features: FeatureLayout
    """Where each raw column sits in the feature matrix (numeric columns, each categorical column's one-hot
    block)."""
    hparams: dict[str, Any]
    """The ``training`` fields after trigger-time Params (``epochs``, ``batch_size``, ``learning_rate``,
    ``weight_decay``, ``optimizer``, ``seed``, ``log_every_steps``) merged with ``training.params``."""
    params: dict[str, Any]
    """``training.params`` alone."""
    features_dir: Path
    """The ``build_features`` output: ``train/val/test.parquet`` and ``feature_spec.json``."""
    raw_snapshot: Path | None
    """The run's ingest snapshot (parquet), for loops that build their own features; ``None`` when not given."""
    checkpoint_dir: Path
    """The job's checkpoint folder (kept across retries); write checkpoints through :meth:`save_checkpoint`."""

    def __init__(self, config: TrainConfig, *, rank: int, world_size: int, local_rank: int, device: torch.device):
        t = config.training
        self._config, self._fingerprint = config, config.fingerprint()
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.is_main, self.distributed, self.device = rank == 0, dist.is_initialized(), device
        self.task = config.task
        self.features_dir = Path(config.features_dir)
        self.raw_snapshot = Path(config.raw_snapshot) if config.raw_snapshot else None
        self.checkpoint_dir = Path(config.checkpoint_dir)
        self.params = dict(t.params)
        self.hparams = {**{k: getattr(t, k) for k in HPARAM_FIELDS}, **self.params}
        spec = read_json(self.features_dir / FEATURE_SPEC_FILE)
        if spec.get("task", config.task) != config.task:
            raise ValueError(f"features in {self.features_dir} are for task {spec['task']!r}, but TrainConfig.task "
                             f"is {config.task!r}")
        self._n_classes = int(spec.get("n_classes") or 0)
        if config.task == "classification" and self._n_classes < 2:
            raise ValueError(f"{self.features_dir / FEATURE_SPEC_FILE}: classification needs n_classes >= 2, found "
                             f"{self._n_classes}")
        self.input_dim = int(spec["input_dim"])
        self.n_outputs = self._n_classes if config.task == "classification" else 1
        self.classes = [str(c) for c in spec["classes"]] if spec.get("classes") else None
        self.features = FeatureLayout.from_feature_spec(spec)
        self._record = _Record()
        self._mlflow: Any = None
        self._started_before = False
        if self.is_main:
            from kiln.tasks.training.mlflow_logging import MlflowLogger

            self._mlflow = MlflowLogger(config, enabled=True)
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)  # fail fast on an unusable folder
            self._started_before = (self.checkpoint_dir / STARTED_FILE).exists()
            if self._started_before and not checkpoints.list_checkpoints(self.checkpoint_dir):
                log.warning("an earlier try of this job ran but left no checkpoint in %s: training starts over from "
                            "the beginning (the loop saved no checkpoint; call ctx.save_checkpoint to resume)",
                            self.checkpoint_dir)
            with fence.holding(self.checkpoint_dir, config.fence_token):
                atomic_write_bytes(self.checkpoint_dir / STARTED_FILE, b"")
        # Each rank its own stream (dropout masks differ by rank), the same on every run.
        torch.manual_seed(t.seed + 1 + rank)

    def load_split(self, name: Literal["train", "val", "test"]) -> tuple[torch.Tensor, torch.Tensor]:
        """A split of the features on CPU: ``x`` float32 ``[n, input_dim]`` and ``y``, int64 class indices ``[n]``
        (classification) or float32 ``[n, 1]`` (regression).

        Raises:
            ValueError: an empty train split, or labels outside the class indices.
        """
        x, y = _read_split(self.features_dir, name)
        return self._tensors(name, x, y)

    def load_shard(self, name: Literal["train", "val", "test"]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This rank's share of a split, as :meth:`load_split` gives the whole: contiguous rows of the split file
        (whose rows are in shuffled order), sizes differing by at most one row between ranks, read from the Parquet
        row groups that hold them only. With one rank it is the whole split.

        Returns:
            ``(x, y, rows in the whole split)``.

        Raises:
            ValueError: an empty train split, a split with fewer rows than ranks, or labels outside the class
                indices.
        """
        x, y, total = _read_shard(self.features_dir, name, self.rank, self.world_size)
        if name == "train" and 0 < total < self.world_size:
            raise ValueError(f"{self.features_dir / 'train.parquet'} has {total} rows, fewer than the "
                             f"{self.world_size} ranks; use fewer ranks or more data")
        features, labels = self._tensors(name, x, y)
        return features, labels, total

    def _tensors(self, name: str, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # Row-major, because batches gather rows (a DataFrame's matrix is column-major).
        features, labels = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
        if name == "train" and len(features) == 0:
            raise ValueError(f"{self.features_dir / 'train.parquet'} has no rows")
        if self.task == "classification":
            bad = labels[(labels < 0) | (labels >= self._n_classes)]
            if len(bad):
                raise ValueError(f"{self.features_dir / name}.parquet: target values {sorted(set(bad.tolist()))[:5]} "
                                 f"are outside the class indices 0..{self._n_classes - 1}")
            return features, labels
        return features, labels.unsqueeze(1)

    def build_model(self) -> nn.Module:
        """The network the spec's ``model`` section names (a built-in one, or ``model.factory``'s), on ``device``.

        Its weights come from ``training.seed`` alone, identical on every rank and every run; the global RNG
        streams are left as they were.

        Raises:
            UserCodeError: the factory does not import, returns no ``nn.Module`` or one with the wrong output shape.
        """
        from kiln.tasks.training.networks import build_model

        spec, devices = self._config.model, [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self._config.training.seed)
            if spec.type == "custom":
                module = build_custom_model(spec, self._config.code_dir, self.features, self.n_outputs)
            else:
                module = build_model(spec, self.input_dim, self.n_outputs)
        return module.to(self.device)

    def load_checkpoint(self, *, max_epoch: int | None = None) -> Checkpoint | None:
        """The newest checkpoint of this job written with the same config, data and code; every rank must call it.

        On a resume it restores this rank's RNG streams (a job restarted on another number of ranks reseeds them
        instead, and continues correctly but not bit-identically); without a checkpoint it seeds them from
        ``training.seed`` and the rank. Logs ``resuming from checkpoint epoch N``, or that the job starts over.

        Args:
            max_epoch: skip checkpoints saved after this epoch (default ``training.epochs``: a shorter run does not
                resume a longer one).
        """
        rec, t = self._record, self._config.training
        rec.load_called = True
        found = broadcast(checkpoints.find_checkpoint(self.checkpoint_dir, self._fingerprint, max_epoch or t.epochs)
                          if self.is_main else None)
        if found is None:
            torch.manual_seed(t.seed + 1 + self.rank)
            self._log_params_once()
            return None
        epoch = int(found["epoch"])
        rec.history, rec.resumed_from, rec.last_epoch = list(found["history"]), epoch, epoch
        if self.is_main:
            log.info("resuming from checkpoint epoch %d (%s)", epoch, self.checkpoint_dir / f"epoch_{epoch:04d}.pt")
        if len(found["rng_states"]) == self.world_size:
            checkpoints.set_rng_state(found["rng_states"][self.rank], self.device)
        else:
            log.warning("checkpoint from %d ranks, now %d: RNG streams restart", len(found["rng_states"]),
                        self.world_size)
            torch.manual_seed(t.seed + 1 + self.rank + epoch * _STREAM_STRIDE)
        return Checkpoint(epoch, found["state"])

    @property
    def stop_requested(self) -> bool:
        """This rank was asked to stop (SIGTERM: the job is preempted and has a grace period to exit).

        :meth:`save_checkpoint` acts on it by itself; a loop with long stretches between checkpoints may read it to
        checkpoint early. It is this rank's flag only, and the ranks get the signal at slightly different times:
        agree on it first (e.g. ``all_reduce`` it with the step's other values), since every rank must call
        :meth:`save_checkpoint` together.
        """
        return _stop_requested

    def save_checkpoint(self, state: dict[str, Any], *, epoch: int) -> None:
        """Save ``state`` as the checkpoint of ``epoch``; every rank must call it (it gathers each rank's RNG state),
        and rank 0's ``state`` is written, atomically, keeping the newest two.

        ``state`` is loaded back with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts
        (``state_dict()`` of modules and optimizers). The metrics logged so far are saved with it.

        Raises:
            JobPreemptedError: a rank was asked to stop (:attr:`stop_requested`); raised on every rank once the
                checkpoint is written.
            StaleFenceError: a newer try of the task took the checkpoint folder over (this job must stop).
        """
        # The stop flags travel with the RNG states: every rank learns of any rank's signal in the same collective.
        gathered = gather((checkpoints.rng_state(self.device), _stop_requested))
        rng_states = [rng for rng, _ in gathered]
        stopping = any(stop for _, stop in gathered)
        self._record.last_epoch = epoch
        if self.is_main:
            self._log_params_once()
            payload = {"epoch": epoch, "fingerprint": self._fingerprint, "state": state, "rng_states": rng_states,
                       "history": self._record.history, "world_size": self.world_size, "api_version": API_VERSION,
                       "config": self._config.to_json(), "fence_token": self._config.fence_token}
            # A job of an earlier try (its task was killed) stops here instead of writing into the retry's state.
            with fence.holding(self.checkpoint_dir, self._config.fence_token):
                checkpoints.save_checkpoint(self.checkpoint_dir, payload)
        if stopping:
            broadcast(None)  # no rank reports the checkpoint saved before rank 0 has written it
            raise JobPreemptedError(epoch)

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        """Log ``metrics`` (keys ``split/name``, e.g. ``val/loss``) at ``step`` to the run's MLflow run and as a
        progress line (rank 0; a no-op elsewhere). They also make ``train_metrics.json``: its ``history`` (one
        entry per call, the step under ``epoch``) and ``final`` (each metric's last value).

        Raises:
            ValueError: a value that is not a finite number.
        """
        if not self.is_main:
            return
        values = {str(k): float(v) for k, v in metrics.items()}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"metric {bad[0]!r} at step {step} is {values[bad[0]]}: the loss diverged or a metric "
                             "is undefined; lower the learning rate or log only finite values")
        self._log_params_once()
        rec = self._record
        if len(rec.history) < MAX_HISTORY:
            rec.history.append({"epoch": step, **values})
        elif not rec.history_full:
            rec.history_full = True
            log.warning("more than %d metric entries: train_metrics.json keeps the first ones, MLflow gets all",
                        MAX_HISTORY)
        log.info("step %d metrics: %s", step, " ".join(f"{k} {v:.4g}" for k, v in values.items()))
        reported = self._config.report_metric
        if reported is not None and reported in values:
            # Exact, for the task that prunes a tuning trial on it (the line above rounds for people).
            log.info("%s %s", METRIC_LINE, json.dumps({"step": step, "value": values[reported]}))
        with fence.holding(self.checkpoint_dir, self._config.fence_token):
            self._mlflow.log_metrics(values, step=step)

    def log(self, msg: str, *args: Any) -> None:
        """A progress line in the task log (rank 0), ``%``-style: ``ctx.log("epoch %d loss %.4f", e, loss)``."""
        if self.is_main:
            log.info(msg, *args)

    def _log_params_once(self) -> None:
        """The run's params, on a fresh start only (a resumed job logged them, and MLflow refuses a changed one)."""
        rec = self._record
        if not self.is_main or rec.params_logged or rec.resumed_from is not None:
            return
        from kiln.tasks.training.mlflow_logging import run_params

        rec.params_logged = True
        with fence.holding(self.checkpoint_dir, self._config.fence_token):
            self._mlflow.log_params(run_params(self._config, self.world_size, self._fingerprint))
