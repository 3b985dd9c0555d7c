"""The ``train`` step: lease devices from the spec's resource pool and train the model on them
(:func:`kiln.tasks.pipeline.training_run.run_training`); in a tuned run, publish the study's best trial instead.

The job checkpoints every epoch under ``<run>/checkpoints``, so a retried task resumes from the last complete
epoch, and rank 0 writes the network and its metrics into ``<run>/train``.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.pipeline.training_run import TrainResult, run_training
from kiln.tasks.settings import get_settings
from kiln.tasks.storage.artifacts import atomic_write_bytes, read_json

if TYPE_CHECKING:
    from kiln.tasks.launch.base import Launcher
    from kiln.tasks.pools.allocation import Allocation

log = logging.getLogger(__name__)


def train(ctx: RunContext, launcher: Launcher | None = None, allocation: Allocation | None = None) -> TrainResult:
    """Train with the spec's launcher into ``<run>/train`` (see :func:`~kiln.tasks.pipeline.training_run.run_training`:
    ``allocation`` ``None`` leases here, blocking).

    Raises:
        TrainingFailedError: the job failed (a retry resumes from its last complete checkpoint).
        PoolError: the devices could not be leased.
    """
    return run_training(ctx, launcher, allocation)


@dataclass(frozen=True)
class BestTrialResult(TrainResult):
    """What ``train`` produced in a tuned run: the study's best trial, published as the run's model."""

    study_name: str
    best_trial: int
    best_value: float
    best_params: dict[str, Any]
    """The best trial's values, by spec field."""
    states: dict[str, int]
    """Trials per state (``COMPLETE``, ``PRUNED``, ``FAIL``, ...)."""


def train_best(ctx: RunContext) -> BestTrialResult:
    """The ``train`` step of a tuned run: publish the study's best trial's network as ``<run>/train`` (so
    ``evaluate``, ``register`` and ``gate`` run unchanged) and log the study's plots and summary to the pipeline
    run's MLflow run, under ``tuning/``.

    Raises:
        TuningError: no trial completed; when every trial failed, the message holds the first error.
    """
    import tempfile
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from kiln.tasks import tuning
    from kiln.tasks.pipeline.tuned_run import DURATION_ATTR, open_run_study
    from kiln.tasks.training.job import METRICS_FILE

    spec = ctx.spec
    assert spec.tuning is not None, "train_best runs tuned pipelines only"
    study = open_run_study(ctx)
    outcome = tuning.study_outcome(study)
    best = study.best_trial
    values = tuning.trial_values(best, spec.tuning.space)
    source = ctx.store.path(ctx.key(keys.trial_key(best.number, keys.TRAIN)))
    ctx.publish(keys.TRAIN, lambda out: shutil.copytree(source, out, dirs_exist_ok=True))
    metrics = read_json(ctx.input_dir(keys.TRAIN) / METRICS_FILE)
    run_id = ctx.mlflow_run()
    client = MlflowClient(get_settings().mlflow_tracking_uri)
    with tempfile.TemporaryDirectory(prefix="kiln-study-") as tmp:
        folder = Path(tmp)
        tuning.write_plots(study, folder, spec.tuning.metric(spec))
        atomic_write_bytes(folder / "study.json", json.dumps({**asdict(outcome), "best_values": values},
                                                              indent=2, default=str).encode())
        client.log_artifacts(run_id, str(folder), "tuning")
    # Tags, not params: a restarted study may find a better trial, and MLflow refuses a changed param.
    for name, value in {"kiln.tuning.best_trial": best.number, "kiln.tuning.study": study.study_name,
                        **{f"kiln.tuning.best.{k}": v for k, v in values.items()}}.items():
        client.set_tag(run_id, name, json.dumps(value) if not isinstance(value, str) else value)
    log.info("best trial %d of study %s: %s %.6g with %s", best.number, study.study_name, outcome.direction,
             outcome.best_value, values)
    return BestTrialResult(model_uri=ctx.store.uri(ctx.key(keys.TRAIN)), mlflow_run_id=run_id,
                           duration_s=float(best.user_attrs.get(DURATION_ATTR, 0.0)),
                           final=metrics.get("final", {}), resumed_from_epoch=metrics.get("resumed_from_epoch"),
                           samples_per_s=metrics.get("samples_per_s"), study_name=study.study_name,
                           best_trial=best.number, best_value=outcome.best_value, best_params=values,
                           states=outcome.states)
