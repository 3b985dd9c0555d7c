"""DAG factory: one Airflow DAG per pipeline spec file in the pipelines folder (``dags/pipelines/*.yaml``).

Wiring only: one task per step of :data:`kiln.tasks.pipeline.steps.STEPS`, in its order (``PipelineStepOperator``;
``TrainOperator`` for the step that runs on leased devices). The steps import their libraries when they run, so this
file parses quickly. Invalid spec files are skipped here and reported by ``kiln_spec_errors.py``; each file is
read within its own limits and time budget (``kiln.tasks.spec.yaml_reader``), so a hostile one is refused quickly.

A spec with a ``monitoring:`` section also gets a monitor DAG, ``<pipeline>_monitor`` (:func:`build_monitor_dag`),
and every spec a scoring DAG, ``<pipeline>_score`` (:func:`build_scoring_dag`).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import (
    DAG,
    Asset,
    AssetOrTimeSchedule,
    AssetWatcher,
    CronTriggerTimetable,
    Param,
    TriggerRule,
    chain,
    task,
)
from airflow.sdk.exceptions import AirflowSkipException

from kiln.operators.access import team_access_control
from kiln.operators.s3_credentials import use_s3_connection
from kiln.operators.score import ScorePartitionOperator, run_scoring_step
from kiln.operators.source_trigger import source_trigger
from kiln.operators.step import PipelineStepOperator
from kiln.operators.train import StudyOperator, TrainOperator, TrialOperator
from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.steps import STEPS, STUDY, TRAIN_BEST
from kiln.tasks.settings import get_settings
from kiln.tasks.spec import PipelineSpec, load_specs
from kiln.tasks.spec.params import param_schemas, scoring_param_schemas

log = logging.getLogger(__name__)


def _params(schemas: dict[str, dict[str, Any]]) -> dict[str, Param]:
    """Trigger-form Params from their schemas (``kiln.tasks.spec.params``), each described by the spec field it
    overrides."""
    # The description twice: plain for the REST API's `description`, Markdown for the trigger form.
    return {name: Param(description=schema.get("description_md"), **schema) for name, schema in schemas.items()}


def _schedule(spec: PipelineSpec, spec_path: Path) -> Any:
    """The spec's cron schedule, its Assets, both (any of them starts a run), or None (triggered runs only).

    The data Asset is :meth:`PipelineSpec.asset_uri` (a local path as a ``file://`` URI). With ``source.watch`` it
    is the source, watched on the triggerer by a :class:`~kiln.operators.source_trigger.SourceChangeTrigger`: new
    data posts an event on it, which starts a run that reads that data. With ``monitoring.on_breach: retrain`` the
    monitor's retrain Asset (:meth:`PipelineSpec.retrain_asset_uri`) starts a run too, on the source's current
    data. Airflow folds the events queued on these Assets while no run has started into the next run: one run
    however many events came.
    """
    assets = []
    uri = spec.asset_uri()
    if uri is not None:
        if uri.startswith("/"):
            uri = Path(uri).as_uri()
        watchers = []
        if spec.source.watch is not None:
            watchers = [AssetWatcher(name=f"{spec.name}_source",
                                     trigger=source_trigger(spec.name, spec.source, spec_path))]
        assets.append(Asset(uri, watchers=watchers))
    if (retrain := spec.retrain_asset_uri()) is not None:
        assets.append(Asset(retrain))
    if not assets:
        return spec.schedule
    condition = assets[0] if len(assets) == 1 else assets[0] | assets[1]
    if spec.schedule is None:
        return condition
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(spec.schedule, timezone="UTC"), assets=condition)


def build_dag(spec: PipelineSpec, spec_path: Path) -> DAG:
    """The DAG of one pipeline spec: ingest >> validate >> clean >> build_features >> train >> evaluate >>
    register >> gate >> infra_validate >> deploy >> verify >> promote; with ``tuning:``, ``train`` is
    ``study >> trial (mapped) >> train`` (:func:`_study_tasks`).

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
        params=_params(param_schemas(spec)),
        default_args={"owner": spec.owner, "retries": 1, "retry_delay": timedelta(seconds=10)},
        # Access (prod profile): the spec's team sees and triggers this DAG; admins and viewers see every DAG.
        access_control=team_access_control(spec.access_team),
        # Bagged from this module's globals only: a DAG whose build raised must not be bagged half-built.
        auto_register=False,
    ) as dag:
        path = str(spec_path)
        # Airflow counts a deferred task's wait in its execution time: allow the lease wait plus the job.
        budget = timedelta(seconds=spec.training.timeout_s + spec.training.resources.wait_timeout_s + 300)
        tasks: list[Any] = []
        for step in STEPS:
            if step.name == keys.TRAIN and spec.tuning is not None:
                tasks += _study_tasks(spec, path, budget)
            elif step.leased:
                tasks.append(TrainOperator(spec_path=path, execution_timeout=budget))
            else:
                tasks.append(PipelineStepOperator(step=step, spec_path=path))
        chain(*tasks)
    return dag


def _study_tasks(spec: PipelineSpec, path: str, budget: timedelta) -> list[Any]:
    """A tuned run's tasks in place of ``train``: ``study``, one mapped ``trial`` per trial (at most
    ``tuning.parallel`` at once), then ``train``, which publishes the best trial once every trial has ended."""
    assert spec.tuning is not None
    study = StudyOperator(step=STUDY, spec_path=path)
    trials = TrialOperator.partial(
        task_id=keys.TRIAL, spec_path=path, execution_timeout=budget,
        max_active_tis_per_dagrun=spec.tuning.parallel, map_index_template="trial {{ task.index }}",
    ).expand(index=study.output)
    # Every trial ended (pruned trials are skipped, failed ones failed): the best completed one goes on.
    best = PipelineStepOperator(step=TRAIN_BEST, spec_path=path, trigger_rule=TriggerRule.ALL_DONE)
    return [study, trials, best]


def _side_dag_settings(spec: PipelineSpec, retry_delay_s: int) -> dict[str, Any]:
    """What a pipeline's monitor and scoring DAGs share: no catch-up, the spec's owner, one retry, the team's
    access, and no auto-registration (bagged from this module's globals only: a DAG whose build raised must not be
    bagged half-built)."""
    return {"start_date": pendulum.datetime(2026, 1, 1, tz="UTC"), "catchup": False,
            "default_args": {"owner": spec.owner, "retries": 1, "retry_delay": timedelta(seconds=retry_delay_s)},
            "access_control": team_access_control(spec.access_team), "auto_register": False}


def build_monitor_dag(spec: PipelineSpec, spec_path: Path) -> DAG:
    """The monitor DAG of a spec with ``monitoring``: ``monitor >> retrain`` on ``monitoring.schedule``.

    ``monitor`` runs :func:`kiln.tasks.monitoring.run.run_monitor` (it fails only on errors: a breach is its
    outcome, in its XCom, the report, ``latest.json`` and the model server's gauges). ``retrain`` is skipped unless
    the outcome requests a retrain (``on_breach: retrain`` outside the cool-down); its success emits the retrain
    Asset event that starts the pipeline's gated run.
    """
    monitoring = spec.monitoring
    if monitoring is None:
        raise ValueError(f"pipeline {spec.name} has no monitoring section: it has no monitor DAG")
    retrain_uri = spec.retrain_asset_uri()
    with DAG(
        dag_id=monitor_dag_id(spec),
        description=f"Drift and quality monitor of {spec.name}'s served model"[:200],
        doc_md=(f"Monitor of the **{spec.name}** pipeline's served model: every run judges the last "
                f"{monitoring.window_hours} h of captured traffic against the champion's training baseline "
                f"(drift per feature and on the predictions, live quality where labels came back) and publishes "
                f"the report to `{spec.name}/_monitor/` in the artifact store and to the champion's MLflow run. "
                f"On a breach: `{monitoring.on_breach}`"
                + (f" (the `retrain` task emits `{retrain_uri}`, at most once per "
                   f"{monitoring.retrain.cooldown_hours} h)" if retrain_uri else "")
                + f".\n\nSpec file: `{spec_path}`"),
        schedule=CronTriggerTimetable(monitoring.schedule, timezone="UTC"),
        # One run at a time: the retrain cool-down state has one writer.
        max_active_runs=1,
        tags=sorted({"kiln", "monitoring", spec.task, *spec.tags}),
        **_side_dag_settings(spec, retry_delay_s=30),
    ) as dag:
        path = str(spec_path)

        @task(task_id="monitor")
        def monitor(spec_file: str, dag_run: Any = None) -> dict[str, Any]:
            from kiln.tasks.monitoring.run import MonitorConfig, run_monitor
            from kiln.tasks.pipeline.context import default_store
            from kiln.tasks.pipeline.endpoint import Endpoint
            from kiln.tasks.spec import load_spec

            use_s3_connection()
            watched = load_spec(Path(spec_file))
            outcome = run_monitor(MonitorConfig.from_spec(watched, Endpoint.of(watched).deployment), default_store(),
                                  dag_run.run_after)
            if outcome.action == "alert":
                log.warning("breach (alert only): %s", outcome.summary)
            return outcome.to_dict()

        outlets = [Asset(retrain_uri)] if retrain_uri else []

        @task(task_id="retrain", outlets=outlets)
        def retrain(outcome: dict[str, Any], dag_run: Any = None, outlet_events: Any = None) -> str:
            if not outcome["retrain_requested"]:
                raise AirflowSkipException("no retrain requested: " + (
                    "no breach" if not outcome["breach"] else
                    f"on_breach is {outcome['action']}" if outcome["action"] != "retrain" else "in the cool-down"))
            from kiln.tasks.monitoring.retrain import record_request
            from kiln.tasks.pipeline.context import default_store

            use_s3_connection()
            record_request(default_store(), outcome["pipeline"], dag_run.run_after, outcome["summary"],
                           outcome["report_key"])
            # labelled: the report folder whose labelled.parquet the triggered run's ingest appends (append_labelled).
            outlet_events[outlets[0]].extra = {"kiln_retrain": {"report": outcome["report_key"],
                                                                "summary": outcome["summary"][:500],
                                                                "labelled": outcome.get("labelled_key"),
                                                                "labelled_rows": outcome.get("labelled_rows", 0)}}
            return f"retrain of {outcome['pipeline']} requested: {outcome['summary']}"

        retrain(monitor(path))
    return dag


def monitor_dag_id(spec: PipelineSpec) -> str:
    """The id of a pipeline's monitor DAG."""
    return f"{spec.name}_monitor"


def build_scoring_dag(spec: PipelineSpec, spec_path: Path) -> DAG:
    """The scoring DAG of a spec: ``prepare >> validate >> partition >> score (mapped) >> commit``, triggered only.

    ``prepare`` resolves the version (Param ``version``: the champion or a number) and stages the input (Param
    ``input``) with ingest's readers, checking its schema against the model's signature; ``validate`` checks it
    with the pipeline's suite; ``score`` is one leased task per partition (:class:`ScorePartitionOperator`, at most
    ``scoring.parallel`` at once); ``commit`` writes the output and its manifest once every partition succeeded,
    and emits the scores Asset. The steps are :mod:`kiln.tasks.scoring.run`'s.
    """
    scores = Asset(spec.scores_asset_uri())
    with DAG(
        dag_id=scoring_dag_id(spec),
        description=f"Batch scoring with {spec.name}'s model"[:200],
        doc_md=(f"Scores a dataset with the **{spec.name}** pipeline's champion (or the version the `version` "
                f"Param names): the `input` Param is read with ingest's readers and checked against the model's "
                f"signature and the pipeline's expectation suite, split into partitions of `partition_rows` rows "
                f"scored in parallel (at most {spec.scoring.parallel} at once, each on {spec.scoring.cpus} leased "
                f"core(s)), and committed under `<output>/<run id>/` in the artifact store: Parquet predictions with "
                f"the row ids and `model_version`, `rejects.parquet` (rows the model cannot take, with the reason) "
                f"and `manifest.json`. A committed run emits `{scores.uri}`.\n\nSpec file: `{spec_path}`"),
        schedule=None,
        max_active_runs=4,
        tags=sorted({"kiln", "scoring", spec.task, *spec.tags}),
        params=_params(scoring_param_schemas(spec)),
        **_side_dag_settings(spec, retry_delay_s=10),
    ) as dag:
        path = str(spec_path)

        # Each task runs one step of kiln.tasks.scoring.run with the run's config (operators.score.run_scoring_step).
        @task(task_id="prepare")
        def prepare(spec_file: str, **context: Any) -> dict[str, Any]:
            from kiln.tasks.scoring import run as steps

            staged = run_scoring_step(spec_file, context, lambda _, config, store, run_id: steps.prepare(
                config, store, run_id))
            return {"rows": staged["rows"], "version": staged["model"]["version"], "input": staged["source_uri"]}

        @task(task_id="validate")
        def validate(spec_file: str, **context: Any) -> dict[str, Any]:
            from kiln.tasks.scoring import run as steps

            return run_scoring_step(spec_file, context, steps.validate)

        @task(task_id="partition")
        def partition(spec_file: str, **context: Any) -> list[dict[str, int]]:
            from kiln.tasks.scoring import run as steps

            return run_scoring_step(spec_file, context, lambda _, *run: steps.partition(*run))

        @task(task_id="commit", outlets=[scores])
        def commit(spec_file: str, **context: Any) -> dict[str, Any]:
            from kiln.tasks.scoring import run as steps

            result = run_scoring_step(spec_file, context, lambda _, *run: steps.commit(*run)).to_dict()
            context["outlet_events"][scores].extra = {"kiln_scores": result}
            return result

        parts = partition(path)
        scored = ScorePartitionOperator.partial(
            task_id="score", spec_path=path, max_active_tis_per_dagrun=spec.scoring.parallel,
            map_index_template="rows {{ task.part['start'] }}..{{ task.part['stop'] }}",
        ).expand(part=parts)
        chain(prepare(path), validate(path), parts, scored, commit(path))
    return dag


def scoring_dag_id(spec: PipelineSpec) -> str:
    """The id of a pipeline's scoring DAG."""
    return f"{spec.name}_score"


def _clashes(dag_id: str, loaded: list[tuple[Path, PipelineSpec]]) -> bool:
    """Whether ``dag_id`` (of a pipeline's monitor or scoring DAG) is another DAG's: a pipeline's name, or another
    pipeline's monitor id."""
    return dag_id in {s.name for _, s in loaded} | {monitor_dag_id(s) for _, s in loaded if s.monitoring}


_loaded = load_specs(get_settings().pipelines_dir)[0]
for _path, _spec in _loaded:
    try:
        globals()[_spec.name] = build_dag(_spec, _path)
    except Exception:  # noqa: BLE001 - a DAG that Airflow refuses must not take the other pipelines' DAGs with it
        log.exception("pipeline spec %s is valid but Airflow refused its DAG; it is left out", _path)
for _path, _spec in _loaded:
    if _spec.monitoring is None:
        continue
    if monitor_dag_id(_spec) in {s.name for _, s in _loaded}:
        log.error("the monitor of %s is left out: its DAG id %s is the name of another pipeline; rename that "
                  "pipeline", _spec.name, monitor_dag_id(_spec))
        continue
    try:
        globals()[monitor_dag_id(_spec)] = build_monitor_dag(_spec, _path)
    except Exception:  # noqa: BLE001 - as above: one refused DAG must not hide the others
        log.exception("the monitor of pipeline spec %s was refused by Airflow; it is left out", _path)
for _path, _spec in _loaded:
    if _clashes(scoring_dag_id(_spec), _loaded):
        log.error("the scoring DAG of %s is left out: its DAG id %s is the id of another DAG; rename that pipeline",
                  _spec.name, scoring_dag_id(_spec))
        continue
    try:
        globals()[scoring_dag_id(_spec)] = build_scoring_dag(_spec, _path)
    except Exception:  # noqa: BLE001 - as above: one refused DAG must not hide the others
        log.exception("the scoring DAG of pipeline spec %s was refused by Airflow; it is left out", _path)
