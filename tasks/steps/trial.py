"""The ``trial`` step of a tuned run: one trial of the run's Optuna study, trained on its own leased devices.

The DAG maps one ``trial`` task over the indices the ``study`` step hands out (:mod:`kiln.tasks.steps.study`).
Each opens its trial in the study (a retried task gets its RUNNING trial back), draws the trial's values from
``tuning.space``, and trains the spec with them applied, like the ``train`` step but into the trial's own folders
(``<run>/trials/<number>/train`` and ``checkpoints``, keyed by the trial's number, which never repeats) and into a
nested MLflow run under the pipeline run's. Rank 0 prints the objective after every epoch
(:data:`kiln.tasks.training.job.METRIC_LINE`); the task reports each value to the study, and when the pruner says
so it stops the job: the trial ends PRUNED, its MLflow run KILLED. A trial that fails is recorded FAIL with its
error, and the study goes on. The devices are leased one priority below the spec's and preemptible: a study's
trials are the pool's background work. A preempted trial is no failure: it stays RUNNING, and its task resumes it
from its checkpoint once granted devices again.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.pools.allocation import Allocation
from kiln.tasks.settings import get_settings

if TYPE_CHECKING:

    from kiln.tasks.launch.base import Launcher

log = logging.getLogger(__name__)


class TrialPrunedError(RuntimeError):
    """The study's pruner stopped the trial after an epoch: an outcome of the search, not a failure."""


@dataclass(frozen=True)
class TrialResult:
    """What one completed trial produced."""

    index: int
    """The task's map index."""
    number: int
    """The trial's number in the study (unique, never reused)."""
    value: float
    """The objective (``tuning.objective.metric``) after the last epoch."""
    params: dict[str, Any]
    """The values the trial trained with, by spec field."""
    model_uri: str
    mlflow_run_id: str
    """The trial's MLflow run, nested under the pipeline run's."""
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the task's XCom value)."""
        return asdict(self)


def trial(ctx: RunContext, index: int, launcher: Launcher | None = None,
          allocation: Allocation | None = None) -> TrialResult:
    """Run the trial of map index ``index`` to its end in the study.

    Args:
        ctx: the tuned run.
        index: the task's map index (one of the ``study`` step's indices).
        launcher: the launcher (the operator passes its own so that ``on_kill`` can stop the job).
        allocation: the leased devices (``None``: lease the trial's request here, blocking).

    Raises:
        TrialPrunedError: the pruner stopped it (recorded PRUNED).
        TrainingFailedError, Exception: the trial failed (recorded FAIL with the error; the study goes on).
    """
    if allocation is None:  # in-process (kiln run): lease here, blocking, as the trial task would have
        from kiln.tasks.pipeline.training_run import lease_here
        from kiln.tasks.pipeline.tuned_run import trial_request

        with lease_here(ctx, trial_request(ctx.spec), f"{keys.TRIAL}[{index}]") as leased:
            return trial(ctx, index, launcher, leased)

    from kiln.tasks import tuning
    from kiln.tasks.launch.base import TrainingPreemptedError, get_launcher
    from kiln.tasks.pipeline.training_run import TrainTarget, run_training
    from kiln.tasks.pipeline.tuned_run import DURATION_ATTR, open_run_study
    from kiln.tasks.tracking.runs import ensure_run, finish_run
    from kiln.tasks.training.job import parse_metric_line
    from kiln.tasks.tuning.study import ERROR_ATTR

    spec = ctx.spec
    if spec.tuning is None:
        raise ValueError(f"pipeline {spec.name!r} has no tuning section: trials run in tuned pipelines only")
    metric = spec.tuning.metric(spec)
    study = open_run_study(ctx)
    opened = tuning.open_trial(study, index)
    settings = get_settings()
    parent = ctx.mlflow_run()
    mlflow_run = ensure_run(settings.mlflow_tracking_uri, settings.mlflow_artifact_root, spec.name,
                            f"{ctx.run_key}/trial-{opened.number}",
                            tags={"mlflow.parentRunId": parent, "kiln.study": study.study_name,
                                  "kiln.trial_number": str(opened.number), "kiln.trial_index": str(index)})

    def failed(error: BaseException | str) -> None:  # the study and the trial's MLflow run both say so
        tuning.fail(opened, error)
        finish_run(settings.mlflow_tracking_uri, mlflow_run, "FAILED")

    try:
        values = tuning.suggest(opened, spec.tuning.space)
        trial_ctx = replace(ctx, spec=tuning.apply_values(spec, values, source=f"trial {opened.number}"))
    except Exception as exc:
        failed(exc)
        raise
    log.info("trial %d (index %d) of study %s: %s", opened.number, index, study.study_name,
             ", ".join(f"{k}={v!r}" for k, v in values.items()))
    launcher = launcher or get_launcher(trial_ctx.spec.training.launcher)
    pruned = threading.Event()

    def on_line(line: str) -> None:
        got = parse_metric_line(line)
        if got is None or pruned.is_set():
            return
        epoch, value = got
        if tuning.report(opened, value, epoch):
            pruned.set()
            launcher.terminate()

    launcher.watch_output(on_line)
    target = TrainTarget(key=ctx.key(keys.trial_key(opened.number, keys.TRAIN)),
                         checkpoints_key=ctx.key(keys.trial_key(opened.number, keys.CHECKPOINTS)),
                         mlflow_run_id=mlflow_run, report_metric=metric)
    with tuning.heartbeat(opened):
        try:
            result = None if pruned.is_set() else run_training(trial_ctx, launcher, allocation, target)
        except TrainingPreemptedError:
            if not pruned.is_set():
                # Not a failure: the trial stays RUNNING (its task beats it while it waits for devices again),
                # and resumes from its checkpoint.
                log.warning("trial %d preempted; it resumes from its checkpoint when granted devices again",
                            opened.number)
                raise
        except Exception as exc:
            if not pruned.is_set():
                failed(exc)
                raise
        if pruned.is_set():
            frozen = tuning.prune(opened)
            finish_run(settings.mlflow_tracking_uri, mlflow_run, "KILLED")
            raise TrialPrunedError(f"trial {opened.number} pruned after epoch {frozen.last_step}: its {metric} "
                                   f"{frozen.intermediate_values.get(frozen.last_step or 0, float('nan')):.4g} was "
                                   f"not promising against the study's other trials")
        assert result is not None
        value = result.final.get(metric)
        if value is None:
            error = (f"tuning.objective.metric: the job did not log {metric!r} (it logged "
                     f"{', '.join(sorted(result.final)) or 'nothing'}); name one of those or log it every epoch")
            failed(error)
            raise ValueError(error)
        opened.set_user_attr(DURATION_ATTR, round(result.duration_s, 3))
        frozen = tuning.finish(opened, value)
        if frozen.state.name != "COMPLETE":  # a value that is not finite fails the trial
            finish_run(settings.mlflow_tracking_uri, mlflow_run, "FAILED")
            raise ValueError(f"trial {opened.number}: {frozen.user_attrs.get(ERROR_ATTR)}")
    finish_run(settings.mlflow_tracking_uri, mlflow_run, "FINISHED")
    return TrialResult(index=index, number=opened.number, value=value, params=values, model_uri=result.model_uri,
                       mlflow_run_id=mlflow_run, duration_s=result.duration_s)
