"""A spec's ``schedule`` and ``asset`` become the DAG's timetable; bad values are refused naming the field."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "dags" / "pipelines" / "penguins_species.yaml"


def _dag(tmp_path: Path, source: dict | None = None, **fields: object):
    sys.path.insert(0, str(REPO / "dags"))
    try:
        from kiln_pipelines import build_dag
    finally:
        sys.path.remove(str(REPO / "dags"))
    from kiln.tasks.spec import load_spec

    data = {**yaml.safe_load(SPEC.read_text()), **fields}
    data["source"] = source or {"uri": "pkg://palmerpenguins/data/penguins.csv"}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return build_dag(load_spec(path), path)


def test_no_schedule_means_triggered_runs_only(tmp_path: Path) -> None:
    dag = _dag(tmp_path, schedule=None)
    assert type(dag.timetable).__name__ == "NullTimetable"
    assert dag.catchup is False


def test_cron_runs_at_its_times_in_utc_without_catchup(tmp_path: Path) -> None:
    dag = _dag(tmp_path, schedule="0 3 * * *")
    assert type(dag.timetable).__name__ == "CronTriggerTimetable"
    assert dag.timetable.expression == "0 3 * * *" and str(dag.timetable.timezone) == "UTC"
    assert dag.catchup is False


def test_asset_events_start_runs(tmp_path: Path) -> None:
    dag = _dag(tmp_path, source={"uri": "s3://landing/penguins/"}, asset="s3://landing/penguins/")
    assert type(dag.timetable).__name__ == "AssetTriggeredTimetable"
    assert dag.timetable.asset_condition.uri == "s3://landing/penguins"
    assert dag.timetable.asset_condition.watchers == [], "an asset without source.watch has no watcher"


def test_an_s3_asset_that_is_not_the_source_is_refused(tmp_path: Path) -> None:
    from kiln.tasks.spec import SpecError

    with pytest.raises(SpecError) as raised:
        _dag(tmp_path, asset="s3://landing/penguins/")
    assert "asset 's3://landing/penguins/' names data that the pipeline does not read" in str(raised.value)
    assert "kiln://" in str(raised.value)


def _watcher(dag):
    [watcher] = dag.timetable.asset_condition.watchers
    return watcher


def test_a_watched_s3_source_is_the_asset_with_a_source_trigger(tmp_path: Path) -> None:
    from kiln.operators.source_trigger import SourceChangeTrigger

    dag = _dag(tmp_path, source={"uri": "s3://landing/penguins/", "watch": {"interval_s": 30}})
    assert type(dag.timetable).__name__ == "AssetTriggeredTimetable"
    assert dag.timetable.asset_condition.uri == "s3://landing/penguins"
    watcher = _watcher(dag)
    assert watcher.name == "penguins_species_source" and isinstance(watcher.trigger, SourceChangeTrigger)
    classpath, kwargs = watcher.trigger.serialize()
    assert classpath == "kiln.operators.source_trigger.SourceChangeTrigger"
    assert kwargs["pipeline"] == "penguins_species" and kwargs["interval_s"] == 30
    assert kwargs["source"]["uri"] == "s3://landing/penguins/" and kwargs["spec_dir"] == str(tmp_path.resolve())
    # The triggerer rebuilds the trigger from these kwargs (after a restart too): plain data, the same trigger.
    assert SourceChangeTrigger(**kwargs).serialize() == (classpath, kwargs)


def test_the_watched_dag_serializes_with_its_watcher(tmp_path: Path) -> None:
    from airflow.serialization.serialized_objects import DagSerialization

    dag = _dag(tmp_path, source={"uri": "s3://landing/penguins/", "watch": {"interval_s": 30}})
    [watcher] = DagSerialization.to_dict(dag)["dag"]["timetable"]["__var"]["asset_condition"]["watchers"]
    assert watcher["trigger"]["classpath"] == "kiln.operators.source_trigger.SourceChangeTrigger"


def test_a_watched_local_folder_is_a_file_asset(tmp_path: Path) -> None:
    data = tmp_path / "landing"
    data.mkdir()
    (data / "part-1.csv").write_text("a\n1\n")
    dag = _dag(tmp_path, source={"uri": "landing", "watch": {"interval_s": 60}})
    assert dag.timetable.asset_condition.uri == data.resolve().as_uri()
    assert _watcher(dag).trigger.serialize()[1]["source"]["uri"] == str(data.resolve())


def test_a_watched_sql_source_is_a_sql_asset(tmp_path: Path) -> None:
    sql = {"conn_id": "warehouse", "query": "SELECT * FROM penguins", "watermark_column": "loaded_at"}
    dag = _dag(tmp_path, source={"sql": sql, "watch": {"interval_s": 60}})
    assert dag.timetable.asset_condition.uri == "sql://warehouse/penguins_species"
    assert _watcher(dag).trigger.serialize()[1]["source"]["sql"]["watermark_column"] == "loaded_at"


def test_cron_and_a_watched_source_either_starts_a_run(tmp_path: Path) -> None:
    dag = _dag(tmp_path, source={"uri": "s3://landing/penguins/", "watch": {"interval_s": 30}}, schedule="@daily")
    assert type(dag.timetable).__name__ == "AssetOrTimeSchedule"
    assert dag.timetable.timetable.expression == "0 0 * * *"
    assert _watcher(dag).name == "penguins_species_source"


def test_cron_and_asset_either_starts_a_run(tmp_path: Path) -> None:
    dag = _dag(tmp_path, schedule="@daily", asset="kiln://penguins/raw")
    assert type(dag.timetable).__name__ == "AssetOrTimeSchedule"
    assert dag.timetable.asset_condition.uri == "kiln://penguins/raw"
    assert dag.timetable.timetable.expression == "0 0 * * *"


@pytest.mark.parametrize(("field", "value", "message"), [
    ("schedule", "61 * * * *", "is not a cron expression"),
    ("schedule", "daily", "is not a cron expression"),
    ("asset", "landing zone", "is not a URI: write scheme://location"),
    ("asset", "airflow://x", "the 'airflow' URI scheme is reserved"),
], ids=["minute-61", "word", "no-scheme", "reserved-scheme"])
def test_bad_schedule_or_asset_is_refused_naming_the_field(tmp_path: Path, field: str, value: str,
                                                           message: str) -> None:
    from kiln.tasks.spec import SpecError

    with pytest.raises(SpecError) as raised:
        _dag(tmp_path, **{field: value})
    assert field in str(raised.value) and message in str(raised.value)
