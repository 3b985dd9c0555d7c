"""The pipeline's wiring in plain Python: spec + run id in, run-keyed artifacts out.

Each function here runs one step for one pipeline run: it builds the step's config from the spec, reads its
inputs from the keys earlier steps published, and publishes its own output atomically. The Airflow DAGs call
these functions (one task each); :func:`run_all` calls them in one process, for notebooks and benchmarks.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kiln.tasks.pools.allocation import Allocation, LeaseRequest, Owner, parse_size
from kiln.tasks.settings import get_settings
from kiln.tasks.spec import PipelineSpec, load_spec
from kiln.tasks.storage.artifacts import ArtifactStore, atomic_write_bytes, read_json, run_key, store_for_root

log = logging.getLogger(__name__)

STEPS = ("ingest", "validate", "clean", "build_features", "train", "evaluate")
#: The steps after ``evaluate``, by module: the candidate is registered and gated, then rolled out.
RELEASE_STEPS = {"register": "kiln.tasks.steps.gate", "gate": "kiln.tasks.steps.gate", "infra_validate": "kiln.tasks.steps.deploy",
                 "deploy": "kiln.tasks.steps.deploy", "verify": "kiln.tasks.steps.deploy", "promote": "kiln.tasks.steps.deploy"}
#: Scratch key (under the run key) where training keeps checkpoints across task retries.
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class RunContext:
    """Everything a step needs to know about the run it belongs to."""

    spec: PipelineSpec
    run_key: str
    store: ArtifactStore
    spec_path: str = ""

    def key(self, step: str) -> str:
        """The artifact key of ``step``'s output in this run."""
        return f"{self.run_key}/{step}"

    def input_dir(self, step: str) -> Path:
        """The published output folder of an earlier step of this run."""
        return self.store.path(self.key(step))


def _publish(ctx: RunContext, step: str, run: Callable[[Path], Any]) -> dict[str, Any]:
    """Run ``run(out_dir)`` inside the store's writer for ``step`` and return its result as a dict whose paths
    point at the published folder (the step itself only sees the temporary one)."""
    with ctx.store.writer(ctx.key(step)) as out:
        result = run(out)
    data = json.loads(json.dumps(result.to_dict(), default=str).replace(str(out), str(ctx.input_dir(step))))
    return data


def default_store() -> ArtifactStore:
    """The store ``KILN_ARTIFACT_ROOT`` names: a local folder (the default) or an ``s3://bucket/prefix``."""
    return store_for_root(get_settings().artifact_root)


def make_context(spec_path: str | Path, run_id: str, params: dict[str, Any] | None = None,
                 store: ArtifactStore | None = None) -> RunContext:
    """Load the spec, apply trigger-time Params, and key the run by ``run_id``.

    Raises:
        SpecError: the spec file or a Param is invalid.
    """
    spec = load_spec(spec_path)
    if params:
        spec = spec.with_overrides(dict(params))
    return RunContext(spec=spec, run_key=run_key(spec.name, run_id), store=store or default_store(),
                      spec_path=str(spec_path))


def ingest(ctx: RunContext) -> dict[str, Any]:
    """Snapshot the source into ``<run>/ingest``, once per run.

    The snapshot is immutable: a retried or re-run ``ingest`` of the same run returns the snapshot already taken
    instead of re-reading a source that may have changed since, so every later step of the run sees the same rows.
    """
    from kiln.tasks.steps.ingest import MANIFEST_FILE, SNAPSHOT_FILE, IngestConfig, IngestResult, run_ingest

    key = ctx.key("ingest")
    if ctx.store.exists(key):
        manifest = read_json(ctx.store.path(key) / MANIFEST_FILE)
        log.info("snapshot for %s already taken (%d rows, sha256 %s); reusing it", ctx.run_key, manifest["rows"],
                 manifest["sha256"][:12])
        fields = IngestResult.__dataclass_fields__
        return {k: v for k, v in manifest.items() if k in fields}
    config = IngestConfig(source=ctx.spec.source, sample_fraction=ctx.spec.sample_fraction,
                          seed=ctx.spec.training.seed)
    result = _publish(ctx, "ingest", lambda out: run_ingest(config, out))
    (ctx.store.path(key) / SNAPSHOT_FILE).chmod(0o444)
    return result


def validate(ctx: RunContext) -> dict[str, Any]:
    """Check the snapshot against the spec's expectations; the report is published even when it fails.

    Raises:
        DataValidationError: an expectation failed (after the report was published).
    """
    from mlflow.tracking import MlflowClient

    from kiln.tasks.steps.validate import MLFLOW_VALIDATION_PATH, ValidateConfig, ValidateResult, run_validate
    from kiln.tasks.tracking.runs import finish_run

    spec = ctx.spec
    config = ValidateConfig(target=spec.target, task=spec.task, columns=dict(spec.columns),
                            expectations=spec.expectations)
    outcome: dict[str, ValidateResult] = {}

    def run(out: Path) -> ValidateResult:
        outcome["result"] = run_validate(config, ctx.input_dir("ingest"), out)
        return outcome["result"]

    published = _publish(ctx, "validate", run)
    # The report goes to the run's MLflow run too, where people open it (the Airflow UI links there).
    s = get_settings()
    run_id = mlflow_run(ctx)
    MlflowClient(s.mlflow_tracking_uri).log_artifacts(run_id, str(ctx.input_dir("validate")), MLFLOW_VALIDATION_PATH)
    result = replace(outcome["result"], report_file=published["report_file"])
    if not result.success:
        finish_run(s.mlflow_tracking_uri, run_id, status="FAILED")
    result.raise_for_failure()
    return published


def clean(ctx: RunContext) -> dict[str, Any]:
    """Clean the validated snapshot into ``<run>/clean``."""
    from kiln.tasks.steps.clean import CleanConfig, run_clean

    spec = ctx.spec
    config = CleanConfig(target=spec.target, task=spec.task, columns=dict(spec.columns), cleaning=spec.cleaning)
    return _publish(ctx, "clean", lambda out: run_clean(config, ctx.input_dir("ingest"), out))


def build_features(ctx: RunContext) -> dict[str, Any]:
    """Split and transform the cleaned data into ``<run>/build_features``."""
    from kiln.tasks.steps.build_features import FeaturesConfig, run_build_features

    spec = ctx.spec
    config = FeaturesConfig(target=spec.target, task=spec.task, features=spec.features, seed=spec.training.seed)
    return _publish(ctx, "build_features", lambda out: run_build_features(config, ctx.input_dir("clean"), out))


def mlflow_run(ctx: RunContext) -> str:
    """The MLflow run of this pipeline run (created on first use, reused on retries)."""
    from kiln.tasks.tracking.runs import ensure_run

    s = get_settings()
    return ensure_run(s.mlflow_tracking_uri, s.mlflow_artifact_root, ctx.spec.name, ctx.run_key,
                      tags={"kiln.spec_hash": ctx.spec.spec_hash(), "kiln.spec_path": ctx.spec_path})


def lease_request(spec: PipelineSpec) -> LeaseRequest:
    """What the ``train`` step leases: ``training.resources`` per node, on ``training.nodes`` nodes."""
    t, r = spec.training, spec.training.resources
    return LeaseRequest(pool=r.pool, nodes=t.nodes, gpus=r.gpus,
                        gpu_memory_min=parse_size(r.gpu_memory_min, field_name="training.resources.gpu_memory_min"),
                        cpus=t.lease_cpus(), memory=parse_size(r.memory, field_name="training.resources.memory"),
                        team=r.team, priority=r.priority, placement=r.placement, ttl_s=float(r.ttl_s),
                        preemptible=r.preemptible)


def train(ctx: RunContext, launcher: Any = None, allocation: Allocation | None = None) -> dict[str, Any]:
    """Train with the spec's launcher into ``<run>/train``; checkpoints survive in ``<run>/checkpoints`` (published
    there as they are written when the store's scratch folders are local to this machine, as on S3).

    Args:
        ctx: the run.
        launcher: a ``kiln.tasks.launch.base.Launcher``; default: the one the spec names. Passed in by the Airflow
            operator so that ``on_kill`` can terminate it.
        allocation: the devices leased for the job; the Airflow operator leases them (deferring while it waits)
            and passes them in. ``None``: lease here, blocking up to ``training.resources.wait_timeout_s``.
    """
    if allocation is None:
        import os
        import socket

        from kiln.tasks.pools.store import LeaseStore, hold

        owner = Owner(run_id=ctx.run_key, task_id="train", host=socket.gethostname(), pid=os.getpid())
        with hold(LeaseStore.from_settings(), lease_request(ctx.spec), owner,
                  timeout_s=ctx.spec.training.resources.wait_timeout_s) as leased:
            return train(ctx, launcher, leased)

    from kiln.tasks.launch.base import get_launcher
    from kiln.tasks.training.checkpoint_sync import CheckpointMirror
    from kiln.tasks.training.job import CONFIG_FILE, METRICS_FILE, TrainConfig

    spec = ctx.spec
    launcher = launcher or get_launcher(spec.training.launcher)
    run_id = mlflow_run(ctx)
    s = get_settings()
    checkpoints = ctx.store.scratch(ctx.key(CHECKPOINTS))
    # Where the scratch folder is this machine's alone (S3), each checkpoint is also published under the same key,
    # and the newest published one comes back first: a retry on another machine resumes too.
    with CheckpointMirror(ctx.store, ctx.key(CHECKPOINTS), checkpoints) as mirror, \
            ctx.store.writer(ctx.key("train")) as out:
        config = TrainConfig(features_dir=str(ctx.input_dir("build_features")), output_dir=str(out),
                             checkpoint_dir=str(checkpoints), task=spec.task, model=spec.model,
                             training=spec.training, mlflow_tracking_uri=s.mlflow_tracking_uri,
                             mlflow_run_id=run_id)
        launched = launcher.launch(config, nproc=spec.training.nproc, workdir=out, allocation=allocation)
        # The published copy of the config names where the model is published, not the temporary folder.
        atomic_write_bytes(out / CONFIG_FILE, replace(config, output_dir=ctx.store.uri(ctx.key("train")))
                           .to_json().encode())
    if mirror.active:
        shutil.rmtree(checkpoints, ignore_errors=True)  # the store has the last one; this disk need not keep it
    log.info("training finished in %.1f s", launched.duration_s)
    metrics = read_json(ctx.input_dir("train") / METRICS_FILE)
    return {"mlflow_run_id": run_id, "duration_s": round(launched.duration_s, 3),
            "final": metrics.get("final", {}), "resumed_from_epoch": metrics.get("resumed_from_epoch"),
            "samples_per_s": metrics.get("samples_per_s"), "model_uri": ctx.store.uri(ctx.key("train"))}


def evaluate(ctx: RunContext) -> dict[str, Any]:
    """Score the trained model on the test split into ``<run>/evaluate`` and close the MLflow run."""
    from kiln.tasks.steps.evaluate import EvaluateConfig, run_evaluate
    from kiln.tasks.tracking.runs import finish_run

    spec = ctx.spec
    s = get_settings()
    run_id = mlflow_run(ctx)
    config = EvaluateConfig(task=spec.task, primary_metric=spec.primary_metric,
                            thresholds=dict(spec.evaluation.thresholds),
                            mlflow_tracking_uri=s.mlflow_tracking_uri, mlflow_run_id=run_id)
    result = _publish(ctx, "evaluate", lambda out: run_evaluate(
        config, ctx.input_dir("build_features"), ctx.input_dir("train"), out))
    finish_run(s.mlflow_tracking_uri, run_id)
    return {**result, "mlflow_run_id": run_id}


def step_function(name: str) -> Callable[[RunContext], dict[str, Any]]:
    """The function that runs step ``name`` (one of ``STEPS`` or ``RELEASE_STEPS``)."""
    if name in RELEASE_STEPS:
        import importlib

        return getattr(importlib.import_module(RELEASE_STEPS[name]), name)
    if name not in STEPS:
        raise ValueError(f"unknown step {name!r}; steps: {', '.join([*STEPS, *RELEASE_STEPS])}")
    return globals()[name]


def run_all(ctx: RunContext, release: bool = True) -> dict[str, Any]:
    """Run every step in this process, in order; returns each step's result and the total duration.

    A candidate the gate rejects ends the run after ``gate`` (the later steps are recorded as skipped, with the
    reason), as the DAG skips them.

    Args:
        ctx: the run.
        release: also run ``RELEASE_STEPS`` (register, gate, deploy ...); ``False`` stops after ``evaluate``.
    """
    from kiln.tasks.steps.gate import GateRejectedError

    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    for step in [*STEPS, *(RELEASE_STEPS if release else ())]:
        log.info("step %s", step)
        try:
            results[step] = step_function(step)(ctx)
        except GateRejectedError as exc:
            results[step] = {"skipped": str(exc)}
            log.info("step %s skipped: %s", step, exc)
    results["duration_s"] = round(time.perf_counter() - t0, 3)
    return results
