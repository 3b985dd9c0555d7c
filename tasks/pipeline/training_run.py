"""One training job of a run, shared by the ``train`` step and a tuned run's ``trial`` steps: what it leases
(:func:`lease_request`), where it publishes (:class:`TrainTarget`: the run's ``train`` output or a trial's own
folders) and running it on leased devices (:func:`run_training`).

The job itself (:mod:`kiln.tasks.training`) runs as ``training.nproc`` DDP ranks per node under the launcher the
spec names (:mod:`kiln.tasks.launch`): local torchrun, or a gang of Docker containers. It checkpoints every epoch
under ``<run>/checkpoints``, so a retried task resumes from the last complete epoch, and rank 0 writes the network
and its metrics into ``<run>/train``.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.pools.allocation import Allocation, LeaseRequest, Owner, parse_size
from kiln.tasks.settings import get_settings
from kiln.tasks.spec import PipelineSpec
from kiln.tasks.storage.artifacts import atomic_write_bytes, read_json

if TYPE_CHECKING:
    from kiln.tasks.launch.base import Launcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What the ``train`` step produced."""

    model_uri: str
    """Where the trained network and its metrics are published (``<run>/train``)."""
    mlflow_run_id: str
    duration_s: float
    """Wall time of the job, restarts included."""
    final: dict[str, float]
    """The last epoch's metrics (``train/loss``, ``val/loss``, ``val/accuracy`` or ``val/rmse``)."""
    resumed_from_epoch: int | None
    """The checkpoint epoch this job continued from; ``None`` for a fresh start."""
    samples_per_s: float | None
    """Global training throughput of the epochs this job ran."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the step's XCom value)."""
        return asdict(self)


def lease_request(spec: PipelineSpec) -> LeaseRequest:
    """What the ``train`` step leases: ``training.resources`` per node, on ``training.nodes`` nodes."""
    t, r = spec.training, spec.training.resources
    return LeaseRequest(pool=r.pool, nodes=t.nodes, gpus=r.gpus,
                        gpu_memory_min=parse_size(r.gpu_memory_min, field_name="training.resources.gpu_memory_min"),
                        cpus=t.lease_cpus(), memory=parse_size(r.memory, field_name="training.resources.memory"),
                        team=r.team, priority=r.priority, placement=r.placement, ttl_s=float(r.ttl_s),
                        preemptible=r.preemptible, grace_s=float(r.preempt_grace_s))


@contextmanager
def lease_here(ctx: RunContext, request: LeaseRequest, task_id: str) -> Iterator[Allocation]:
    """Lease ``request`` in this process, blocking up to ``training.resources.wait_timeout_s``, and hold it for
    the block (a run outside Airflow, where no operator leases and defers). The lease is not preemptible here:
    nothing would queue a preempted job again."""
    from kiln.tasks.pools.keepalive import hold
    from kiln.tasks.pools.store import LeaseStore

    owner = Owner(run_id=ctx.run_key, task_id=task_id, host=socket.gethostname(), pid=os.getpid())
    with hold(LeaseStore.from_settings(), replace(request, preemptible=False), owner,
              timeout_s=ctx.spec.training.resources.wait_timeout_s) as leased:
        yield leased


@dataclass(frozen=True)
class TrainTarget:
    """Where one training job publishes: the run's ``train`` output, or a tuning trial's own folders."""

    key: str
    """The store key of the published network and metrics."""
    checkpoints_key: str
    """The store key of its checkpoints (a retry resumes from them)."""
    mlflow_run_id: str
    """The MLflow run the job logs to."""
    report_metric: str | None = None
    """A metric the job also prints as machine-readable lines (a trial's objective, read to prune it)."""


def run_target(ctx: RunContext) -> TrainTarget:
    """The run's own target: ``<run>/train``, ``<run>/checkpoints`` and the run's MLflow run."""
    return TrainTarget(ctx.key(keys.TRAIN), ctx.key(keys.CHECKPOINTS), ctx.mlflow_run())


def run_training(ctx: RunContext, launcher: Launcher | None = None, allocation: Allocation | None = None,
                 target: TrainTarget | None = None) -> TrainResult:
    """Train with the spec's launcher into ``<run>/train``; checkpoints survive in ``<run>/checkpoints`` (published
    there as they are written when the store's scratch folders are local to this machine, as on S3).

    Args:
        ctx: the run.
        launcher: the launcher to run the job; default: the one the spec names. Passed in by the Airflow operator
            so that ``on_kill`` can terminate it.
        allocation: the devices leased for the job; the Airflow operator leases them (deferring while it waits)
            and passes them in. ``None``: lease here, blocking up to ``training.resources.wait_timeout_s``.
        target: where to publish and log (a tuning trial's); default: the run's (:func:`run_target`).

    Raises:
        TrainingFailedError: the job failed (a retry resumes from its last complete checkpoint).
        PoolError: the devices could not be leased.
    """
    if allocation is None:
        with lease_here(ctx, lease_request(ctx.spec), keys.TRAIN) as leased:
            return run_training(ctx, launcher, leased, target)

    from kiln.tasks.launch.base import get_launcher
    from kiln.tasks.training import fence
    from kiln.tasks.training.checkpoint_sync import CheckpointMirror
    from kiln.tasks.training.job import CONFIG_FILE, METRICS_FILE, TrainConfig
    from kiln.tasks.training.user_code import code_hash

    spec = ctx.spec
    launcher = launcher or get_launcher(spec.training.launcher)
    target = target or run_target(ctx)
    run_id = target.mlflow_run_id
    checkpoints = ctx.store.scratch(target.checkpoints_key)
    published = ctx.store.uri(target.key)
    # Where the scratch folder is this machine's alone (S3), each checkpoint is also published under the same key,
    # and the newest published one comes back first: a retry on another machine resumes too.
    token = f"{allocation.lease_id}/{uuid.uuid4().hex[:12]}"  # this try's, unique even when a lease is reused
    with CheckpointMirror(ctx.store, target.checkpoints_key, checkpoints) as mirror, \
            ctx.store.writer(target.key) as out:
        config = TrainConfig(features_dir=str(ctx.input_dir(keys.BUILD_FEATURES)), output_dir=str(out),
                             checkpoint_dir=str(checkpoints), task=spec.task, model=spec.model,
                             training=spec.training, mlflow_tracking_uri=get_settings().mlflow_tracking_uri,
                             mlflow_run_id=run_id, fence_token=token, code_dir=spec.code.path,
                             code_hash=code_hash(spec.code.path) if spec.code.path else None,
                             raw_snapshot=_raw_snapshot(ctx), requirements=tuple(spec.code.requirements),
                             report_metric=target.report_metric)
        # This try owns the checkpoints from now on: a job an earlier, killed try left running stops writing.
        fence.claim(checkpoints, token)
        launched = launcher.launch(config, nproc=spec.training.nproc, workdir=out, allocation=allocation)
        # The published copy of the config names where the model is published, not the temporary folder.
        atomic_write_bytes(out / CONFIG_FILE, replace(config, output_dir=published).to_json().encode())
    if mirror.active:
        shutil.rmtree(checkpoints, ignore_errors=True)  # the store has the last one; this disk need not keep it
    log.info("training finished in %.1f s", launched.duration_s)
    metrics = read_json(ctx.store.path(target.key) / METRICS_FILE)
    return TrainResult(model_uri=published, mlflow_run_id=run_id, duration_s=round(launched.duration_s, 3),
                       final=metrics.get("final", {}), resumed_from_epoch=metrics.get("resumed_from_epoch"),
                       samples_per_s=metrics.get("samples_per_s"))


def _raw_snapshot(ctx: RunContext) -> str | None:
    """The ingest snapshot for a user loop (which may build its own features); kiln's loop reads only the features,
    so the snapshot is not fetched (from S3) for it."""
    if not ctx.spec.training.entrypoint or not ctx.store.exists(ctx.key(keys.INGEST)):
        return None
    return str(ctx.input_dir(keys.INGEST) / keys.SNAPSHOT_FILE)


