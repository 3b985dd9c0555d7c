"""DAG factory: one Airflow DAG per pipeline spec file in the pipelines folder (``dags/pipelines/*.yaml``).

Wiring only: one task per step of :data:`kiln.tasks.pipeline.steps.STEPS`, in its order (``PipelineStepOperator``;
``TrainOperator`` for the step that runs on leased devices). The steps import their libraries when they run, so this
file parses quickly. Invalid spec files are skipped here and reported by ``kiln_spec_errors.py``; each file is
read within its own limits and time budget (``kiln.tasks.spec.yaml_reader``), so a hostile one is refused quickly.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, Asset, AssetOrTimeSchedule, AssetWatcher, CronTriggerTimetable, Param, chain

from kiln.operators.access import team_access_control
from kiln.operators.source_trigger import source_trigger
from kiln.operators.step import PipelineStepOperator
from kiln.operators.train import TrainOperator
from kiln.tasks.pipeline.steps import STEPS
from kiln.tasks.settings import get_settings
from kiln.tasks.spec import PipelineSpec, load_specs
from kiln.tasks.spec.params import param_schemas

log = logging.getLogger(__name__)


def _params(spec: PipelineSpec) -> dict[str, Param]:
    """Trigger-form Params, each described by the spec field it overrides (``kiln.tasks.spec.params``)."""
    # The description twice: plain for the REST API's `description`, Markdown for the trigger form.
    return {name: Param(description=schema.get("description_md"), **schema)
            for name, schema in param_schemas(spec).items()}


def _schedule(spec: PipelineSpec, spec_path: Path) -> Any:
    """The spec's cron schedule, its Asset, both (either starts a run), or None (triggered runs only).

    The Asset is :meth:`PipelineSpec.asset_uri` (a local path as a ``file://`` URI). With ``source.watch`` it is the
    source, watched on the triggerer by a :class:`~kiln.operators.source_trigger.SourceChangeTrigger`: new data
    posts an event on it, which starts a run that reads that data.
    """
    uri = spec.asset_uri()
    if uri is None:
        return spec.schedule
    if uri.startswith("/"):
        uri = Path(uri).as_uri()
    watchers = []
    if spec.source.watch is not None:
        watchers = [AssetWatcher(name=f"{spec.name}_source", trigger=source_trigger(spec.name, spec.source, spec_path))]
    asset = Asset(uri, watchers=watchers)
    if spec.schedule is None:
        return asset
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(spec.schedule, timezone="UTC"), assets=asset)


def build_dag(spec: PipelineSpec, spec_path: Path) -> DAG:
    """The DAG of one pipeline spec: ingest >> validate >> clean >> build_features >> train >> evaluate >>
    register >> gate >> infra_validate >> deploy >> verify >> promote.

    A candidate the gate rejects leaves ``gate`` successful (its decision is the output) and the rollout skipped.
    Each step's task page links to the run's MLflow run (and the validation report, the gate decision).
    """
    summary = (spec.description.strip().splitlines() or [spec.name])[0]
    with DAG(
        dag_id=spec.name,
        description=summary[:200],
        doc_md=f"{spec.description}\n\nSpec file: `{spec_path}` (hash `{spec.spec_hash()[:12]}`)",
        schedule=_schedule(spec, spec_path),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=4,
        tags=sorted({"kiln", spec.task, *spec.tags}),
        params=_params(spec),
        default_args={"owner": spec.owner, "retries": 1, "retry_delay": timedelta(seconds=10)},
        # Access (prod profile): the spec's team sees and triggers this DAG; admins and viewers see every DAG.
        access_control=team_access_control(spec.access_team),
    ) as dag:
        path = str(spec_path)
        # Airflow counts a deferred task's wait in its execution time: allow the lease wait plus the job.
        budget_s = spec.training.timeout_s + spec.training.resources.wait_timeout_s + 300
        chain(*(TrainOperator(spec_path=path, execution_timeout=timedelta(seconds=budget_s)) if step.leased
                else PipelineStepOperator(step=step, spec_path=path) for step in STEPS))
    return dag


for _path, _spec in load_specs(get_settings().pipelines_dir)[0]:
    try:
        globals()[_spec.name] = build_dag(_spec, _path)
    except Exception:  # noqa: BLE001 - a DAG that Airflow refuses must not take the other pipelines' DAGs with it
        log.exception("pipeline spec %s is valid but Airflow refused its DAG; it is left out", _path)
