"""A spec's ``monitoring:`` section becomes a ``<pipeline>_monitor`` DAG (monitor >> retrain, the retrain task
emitting the pipeline's retrain Asset), and ``on_breach: retrain`` adds that Asset to the pipeline DAG's schedule."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "dags" / "pipelines" / "penguins_species.yaml"
RETRAIN = "kiln://penguins_species/retrain"


def _factory():
    sys.path.insert(0, str(REPO / "dags"))
    try:
        import kiln_pipelines
    finally:
        sys.path.remove(str(REPO / "dags"))
    return kiln_pipelines


def _spec(tmp_path: Path, monitoring: dict | None = None, **fields: object):
    from kiln.tasks.spec import load_spec

    data = {**yaml.safe_load(SPEC.read_text()), **fields}
    data["monitoring"] = {**data["monitoring"], **(monitoring or {})}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_spec(path), path


def test_the_monitor_dag_runs_monitor_then_retrain_on_its_own_schedule(tmp_path: Path) -> None:
    spec, path = _spec(tmp_path, {"schedule": "15 * * * *", "on_breach": "retrain"})
    dag = _factory().build_monitor_dag(spec, path)
    assert dag.dag_id == "penguins_species_monitor"
    assert type(dag.timetable).__name__ == "CronTriggerTimetable"
    assert dag.timetable.expression == "15 * * * *" and dag.catchup is False and dag.max_active_runs == 1
    assert dag.doc_md and {"kiln", "monitoring"} <= set(dag.tags) and RETRAIN in dag.doc_md
    assert [t.task_id for t in dag.topological_sort()] == ["monitor", "retrain"]
    assert dag.get_task("monitor").downstream_task_ids == {"retrain"}
    assert [a.uri for a in dag.get_task("retrain").outlets] == [RETRAIN]
    assert dag.get_task("monitor").outlets == []
    for t in dag.tasks:
        assert t.owner == "ml-platform" and t.retries >= 1, t.task_id


def test_an_alerting_monitor_emits_nothing_and_leaves_the_pipeline_schedule_alone(tmp_path: Path) -> None:
    spec, path = _spec(tmp_path, {"on_breach": "alert"}, schedule=None)
    factory = _factory()
    assert factory.build_monitor_dag(spec, path).get_task("retrain").outlets == []
    assert type(factory.build_dag(spec, path).timetable).__name__ == "NullTimetable"


def test_retrain_on_breach_adds_the_retrain_asset_to_the_pipeline_schedule(tmp_path: Path) -> None:
    factory = _factory()
    alone = factory.build_dag(*_spec(tmp_path, {"on_breach": "retrain"}, schedule=None))
    assert type(alone.timetable).__name__ == "AssetTriggeredTimetable"
    assert alone.timetable.asset_condition.uri == RETRAIN
    with_cron = factory.build_dag(*_spec(tmp_path, {"on_breach": "retrain"}, schedule="@daily"))
    assert type(with_cron.timetable).__name__ == "AssetOrTimeSchedule"
    assert with_cron.timetable.asset_condition.uri == RETRAIN
    assert with_cron.timetable.timetable.expression == "0 0 * * *"
    # With the pipeline's own Asset too: either Asset (or the cron) starts a run.
    both = factory.build_dag(*_spec(tmp_path, {"on_breach": "retrain"}, schedule="@daily",
                                    asset="kiln://penguins/raw"))
    condition = both.timetable.asset_condition
    assert type(condition).__name__ == "AssetAny"
    assert [a.uri for a in condition.objects] == ["kiln://penguins/raw", RETRAIN]


def test_a_monitor_whose_id_is_another_pipeline_is_left_out(tmp_path: Path, monkeypatch, caplog) -> None:
    import runpy

    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    data = yaml.safe_load(SPEC.read_text())
    (pipelines / "penguins_species.yaml").write_text(yaml.safe_dump(data))
    (pipelines / "clash.yaml").write_text(yaml.safe_dump({**data, "name": "penguins_species_monitor",
                                                          "monitoring": None}))
    monkeypatch.setenv("KILN_PIPELINES_DIR", str(pipelines))
    dags = runpy.run_path(str(REPO / "dags" / "kiln_pipelines.py"))
    assert dags["penguins_species_monitor"].get_task("ingest")  # the pipeline of that name, not a monitor
    assert "its DAG id penguins_species_monitor is the name of another pipeline" in caplog.text
