"""``TrainOperator`` and ``DockerTrainOperator``: the ``train`` step on devices leased from a resource pool; and
``TrialOperator``: one trial of a tuned run's study, mapped over the ``study`` step's indices."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperatorLink
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
from airflow.triggers.base import TriggerEvent

from kiln.operators.links import step_links
from kiln.operators.pools import PooledOperator, PoolLeaseTrigger
from kiln.operators.step import PipelineStepOperator, noting_failure, run_context
from kiln.tasks.pipeline import keys

if TYPE_CHECKING:
    from kiln.tasks.pipeline.context import RunContext
    from kiln.tasks.pools.allocation import Allocation, LeaseRequest


class TrainOperator(PooledOperator):
    """Train the model of one pipeline run with the launcher its spec names (local torchrun by default).

    Leases ``training.resources`` (per node, ``training.nodes`` nodes) from the spec's pool first, deferring while
    the request waits; the job sees only the leased GPUs and CPU cores. The job checkpoints every epoch under the
    run's key, so an Airflow retry resumes from the last complete epoch instead of starting over.

    Args:
        spec_path: the pipeline spec file.
    """

    template_fields: Sequence[str] = ("spec_path",)
    ui_color = "#f0e4ff"
    #: Forces a launcher regardless of the spec (``None``: the spec's ``training.launcher`` / the Param).
    launcher_name: str | None = None

    def __init__(self, *, spec_path: str, **kwargs: Any) -> None:
        super().__init__(**{"task_id": keys.TRAIN, **kwargs})
        self.spec_path = spec_path
        self._launcher: Any = None

    @property
    def operator_extra_links(self) -> tuple[BaseOperatorLink, ...]:  # type: ignore[override]
        return step_links(keys.TRAIN)

    def execute(self, context: Any) -> Any:
        from kiln.tasks.pipeline.step_cache import reuse
        from kiln.tasks.pipeline.steps import step_named

        with noting_failure(context):
            # A cached model needs no devices: the cache is looked up before anything is leased.
            cached = reuse(step_named(keys.TRAIN), self._context(context))
            return cached if cached is not None else super().execute(context)

    def execute_granted(self, context: Any, event: dict[str, Any]) -> Any:
        with noting_failure(context):
            return super().execute_granted(context, event)

    def _context(self, context: Any) -> RunContext:
        return run_context(self.spec_path, context, {"launcher": self.launcher_name} if self.launcher_name else None)

    def lease_request(self, context: Any) -> tuple[LeaseRequest, float]:
        from kiln.tasks.pipeline.training_run import lease_request

        spec = self._context(context).spec
        return lease_request(spec), spec.training.resources.wait_timeout_s

    def run_leased(self, context: Any, allocation: Allocation) -> dict[str, Any]:
        from kiln.tasks.launch.base import TrainingFailedError, get_launcher
        from kiln.tasks.pipeline.step_cache import run_step
        from kiln.tasks.pipeline.steps import step_named
        from kiln.tasks.steps.train import train

        ctx = self._context(context)
        self._launcher = get_launcher(ctx.spec.training.launcher)
        launcher = self._launcher
        try:
            return run_step(step_named(keys.TRAIN), ctx,
                            run=lambda ctx: train(ctx, launcher, allocation=allocation))
        except TrainingFailedError:
            self.log.error("training failed; a retry resumes from the last complete checkpoint")
            raise
        finally:
            self._launcher = None

    def stop_work(self) -> None:
        launcher = self._launcher
        if launcher is not None:
            self.log.info("stopping the training job")
            launcher.terminate()

    def preempt_work(self, grace_s: float) -> None:
        launcher = self._launcher
        if launcher is not None:
            self.log.info("asking the training job to checkpoint and exit within %.0f s", grace_s)
            launcher.preempt(grace_s)


class DockerTrainOperator(TrainOperator):
    """:class:`TrainOperator` that always runs the job as a gang of Docker containers, one per leased node.

    Each container runs torchrun (c10d rendezvous on the rank-0 node; NCCL on GPUs, gloo on CPU) with the node's
    leased GPUs as device requests, its cores as the cpuset and its memory as the limit. The gang starts and
    stops together, restarts from its last checkpoint up to ``training.max_restarts`` times, and its containers
    and network are removed on every exit path, ``on_kill`` included.
    """

    launcher_name = "docker"
    ui_color = "#dbeafe"


class StudyOperator(PipelineStepOperator):
    """The ``study`` step of a tuned run. Its XCom is the list of trial indices, which the ``trial`` tasks are
    mapped over (Airflow maps over a task's return value only); the study's plan is the XCom ``study``."""

    ui_color = "#fde7c8"

    def execute(self, context: Any) -> Any:
        plan = super().execute(context)
        context["ti"].xcom_push(key=keys.STUDY, value=plan)
        return list(plan["indices"])


class TrialOperator(TrainOperator):
    """One trial of a tuned run's study (:func:`kiln.tasks.steps.trial.trial`) on its own leased devices, leased
    one priority below the spec's and preemptible. A pruned trial ends skipped; one that failed by itself fails
    without a retry (it is recorded FAIL in the study, and a retry would be a new trial); the study goes on either
    way. A task whose worker died is retried: it gets its RUNNING trial back and resumes from its checkpoint.

    Args:
        spec_path: the pipeline spec file.
        index: the trial's index (the task's map index).
    """

    template_fields: Sequence[str] = ("spec_path",)
    ui_color = "#ece4ff"
    # Mapped operators read their links from the class (TrainOperator's property is per instance).
    operator_extra_links = step_links(keys.TRIAL)

    def __init__(self, *, spec_path: str, index: int, **kwargs: Any) -> None:
        super().__init__(spec_path=spec_path, **{"task_id": keys.TRIAL, **kwargs})
        self.index = index

    def execute(self, context: Any) -> Any:
        with noting_failure(context):  # no step cache: every trial trains
            return PooledOperator.execute(self, context)

    def lease_request(self, context: Any) -> tuple[LeaseRequest, float]:
        from kiln.tasks.pipeline.tuned_run import trial_request

        ctx = self._context(context)
        return trial_request(ctx.spec, ctx.run_key), ctx.spec.training.resources.wait_timeout_s

    def run_leased(self, context: Any, allocation: Allocation) -> dict[str, Any]:
        from kiln.tasks.launch.base import TrainingPreemptedError, get_launcher
        from kiln.tasks.steps.trial import TrialPrunedError, trial

        ctx = self._context(context)
        self._launcher = get_launcher(ctx.spec.training.launcher)
        try:
            return trial(ctx, int(self.index), self._launcher, allocation).to_dict()
        except TrialPrunedError as exc:
            raise AirflowSkipException(str(exc)) from exc
        except TrainingPreemptedError:
            raise  # the trial stays RUNNING: the task queues for devices again and resumes it
        except Exception as exc:
            raise AirflowFailException(str(exc)) from exc
        finally:
            self._launcher = None

    def wait_trigger(self, context: Any, lease_id: str, deadline: float) -> PoolLeaseTrigger:
        from kiln.tasks.tuning import study_name

        spec = self._context(context).spec
        return TrialLeaseTrigger(lease_id=lease_id, deadline=deadline, poll_s=self.poll_interval_s,
                                 settle_s=self.grant_settle_s, study=study_name(spec.name, context["run_id"]),
                                 index=int(self.index))


class TrialLeaseTrigger(PoolLeaseTrigger):
    """:class:`PoolLeaseTrigger` for a trial task, which also keeps the heartbeat of the task's RUNNING trial while
    it waits: a preempted trial queues for devices again, and without a heartbeat the study would take it for dead
    after :data:`kiln.tasks.tuning.study.GRACE_S` and fail it."""

    def __init__(self, lease_id: str, deadline: float, poll_s: float = 1.0, settle_s: float = 0.0, *, study: str,
                 index: int):
        super().__init__(lease_id, deadline, poll_s, settle_s)
        self.study = study
        self.index = index

    def serialize(self) -> tuple[str, dict[str, Any]]:
        _, kwargs = super().serialize()
        return "kiln.operators.train.TrialLeaseTrigger", {**kwargs, "study": self.study, "index": self.index}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        beating = asyncio.create_task(self._beat())
        try:
            async for event in super().run():
                yield event
        finally:
            beating.cancel()

    async def _beat(self) -> None:
        from kiln.tasks.tuning.study import HEARTBEAT_S, beat_running, open_storage

        storage = await asyncio.to_thread(open_storage)
        try:
            while True:
                try:
                    await asyncio.to_thread(beat_running, storage, self.study, self.index)
                except Exception as exc:  # noqa: BLE001 (the next beat may get through; the wait goes on)
                    self.log.warning("could not record the heartbeat of trial index %d: %s", self.index, exc)
                await asyncio.sleep(HEARTBEAT_S)
        finally:
            storage.remove_session()
            storage.engine.dispose()
