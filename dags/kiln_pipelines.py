"""DAG factory: one Airflow DAG per pipeline spec file in the pipelines folder (``dags/pipelines/*.yaml``).

Wiring only: each task calls one function of ``tasks.pipeline``; heavy imports happen inside task bodies so this
file parses quickly. Invalid spec files are skipped here and reported by ``kiln_spec_errors.py``.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from operators.train import TrainOperator
from tasks.pipeline import RELEASE_STEPS
from tasks.settings import get_settings
from tasks.spec import PipelineSpec, load_specs


def _params(spec: PipelineSpec) -> dict[str, Param]:
    """Trigger-form Params; each overrides the spec field of the same name (see ``tasks.spec.PARAM_FIELDS``)."""
    t = spec.training
    return {
        "epochs": Param(t.epochs, type="integer", minimum=1, maximum=10_000, title="Epochs",
                        description="Passes over the training split."),
        "learning_rate": Param(t.learning_rate, type="number", exclusiveMinimum=0, maximum=10,
                               title="Learning rate"),
        "batch_size": Param(t.batch_size, type="integer", minimum=1, maximum=65_536, title="Batch size",
                            description="Per worker process."),
        "seed": Param(t.seed, type="integer", minimum=0, title="Seed",
                      description="Seeds sampling, the split and training: same seed, same model."),
        "nproc": Param(t.nproc, type="integer", minimum=1, maximum=64, title="Worker processes",
                       description="DDP ranks per node."),
        "launcher": Param(t.launcher, type="string", enum=["local", "docker"], title="Launcher",
                          description="local: torchrun on the worker's machine; docker: one container per node."),
        "nodes": Param(t.nodes, type="integer", minimum=1, maximum=256, title="Nodes",
                       description="Nodes in the training gang (more than one needs the docker launcher)."),
        "sample_fraction": Param(spec.sample_fraction, type="number", exclusiveMinimum=0, maximum=1,
                                 title="Sample fraction", description="Share of source rows used (seeded)."),
        "deployment": Param(spec.deployment.strategy, type="string", enum=["direct", "canary", "none"],
                            title="Deployment",
                            description="direct: serve a candidate that passes the gate at once; canary: a share of "
                                        "traffic first, promoted or rolled back on its error rate and latency; "
                                        "none: move the registry's champion alias only."),
    }


def _step(name: str, spec_path: str):
    """A TaskFlow task named ``name`` that runs ``tasks.pipeline.<name>`` for the current run."""

    def run_step(params: dict[str, Any] | None = None, run_id: str | None = None, **_upstream: Any) -> Any:
        from tasks import pipeline
        from tasks.infra_validate import InfraValidationError
        from tasks.release import GateRejectedError
        from tasks.rollout import DeploymentFailedError
        from tasks.spec import SpecError
        from tasks.validate import DataValidationError

        try:
            ctx = pipeline.make_context(spec_path, run_id or "manual", dict(params or {}))
            return pipeline.step_function(name)(ctx)
        except GateRejectedError as exc:  # a rejected candidate is an outcome, not a failure: skip the rollout
            raise AirflowSkipException(str(exc)) from exc
        # Retrying cannot fix bad data, a bad spec, or a candidate that failed in the serving runtime.
        except (SpecError, DataValidationError, InfraValidationError, DeploymentFailedError) as exc:
            raise AirflowFailException(str(exc)) from exc

    run_step.__name__ = name
    return task(task_id=name)(run_step)


def build_dag(spec: PipelineSpec, spec_path: Path) -> DAG:
    """The DAG of one pipeline spec: ingest >> validate >> clean >> build_features >> train >> evaluate >>
    register >> gate >> infra_validate >> deploy >> verify >> promote.

    A candidate the gate rejects leaves ``gate`` successful (its decision is the output) and the rollout skipped.
    """
    summary = (spec.description.strip().splitlines() or [spec.name])[0]
    with DAG(
        dag_id=spec.name,
        description=summary[:200],
        doc_md=f"{spec.description}\n\nSpec file: `{spec_path}` (hash `{spec.spec_hash()[:12]}`)",
        schedule=spec.schedule,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=4,
        tags=sorted({"kiln", spec.task, *spec.tags}),
        params=_params(spec),
        default_args={"owner": spec.owner, "retries": 1, "retry_delay": timedelta(seconds=10)},
    ) as dag:
        path = str(spec_path)
        ingested = _step("ingest", path)()
        validated = _step("validate", path)(_upstream=ingested)
        cleaned = _step("clean", path)(_upstream=validated)
        features = _step("build_features", path)(_upstream=cleaned)
        # Airflow counts a deferred task's wait in its execution time: allow the lease wait plus the job.
        budget_s = spec.training.timeout_s + spec.training.resources.wait_timeout_s + 300
        trained = TrainOperator(task_id="train", spec_path=path, execution_timeout=timedelta(seconds=budget_s))
        features >> trained
        upstream: Any = _step("evaluate", path)(_upstream=trained.output)
        for name in RELEASE_STEPS:
            upstream = _step(name, path)(_upstream=upstream)
    return dag


for _path, _spec in load_specs(get_settings().pipelines_dir)[0]:
    globals()[_spec.name] = build_dag(_spec, _path)
