"""A spec's ``schedule`` and ``asset`` become the DAG's timetable; bad values are refused naming the field."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "dags" / "pipelines" / "penguins_species.yaml"


def _dag(tmp_path: Path, **fields: object):
    sys.path.insert(0, str(REPO / "dags"))
    try:
        from kiln_pipelines import build_dag
    finally:
        sys.path.remove(str(REPO / "dags"))
    from kiln.tasks.spec import load_spec

    data = {**yaml.safe_load(SPEC.read_text()), **fields}
    data["source"]["uri"] = "pkg://palmerpenguins/data/penguins.csv"
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
    dag = _dag(tmp_path, asset="s3://landing/penguins/")
    assert type(dag.timetable).__name__ == "AssetTriggeredTimetable"
    assert dag.timetable.asset_condition.uri == "s3://landing/penguins"


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
