"""First contact: data kiln has never seen, each with one spec written from the README, and damaged copies of it.

Every dataset is written by the test. The pipelines run in this process (``run_all``: the same step functions the
DAG's tasks call); what a new user sees from the command line runs ``kiln run`` as a program.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from kiln.tasks.errors import DataError
from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import make_context
from kiln.tasks.pipeline.runner import RunResult, run_all
from kiln.tasks.steps.clean import CleanError
from kiln.tasks.steps.validate import DataValidationError

pytestmark = pytest.mark.integration

FAST = {"epochs": 4, "nproc": 1}


def write_pipeline(folder: Path, name: str, df: pd.DataFrame, target: str, task: str, **spec: Any) -> Path:
    """A CSV of ``df`` and a spec for it, as a new user would write them; returns the spec file."""
    folder.mkdir(parents=True, exist_ok=True)
    df.to_csv(folder / f"{name}.csv", index=False)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "source": {"uri": f"{name}.csv"}, "target": target, "task": task,
                                    **spec}))
    return path


def regression_frame(rows: int, scale: float, offset: float, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=rows), rng.normal(size=rows)
    kind = rng.choice(["flat", "house", "studio"], size=rows)
    bonus = pd.Series(kind).map({"flat": 0.0, "house": 1.0, "studio": -0.5}).to_numpy()
    y = offset + scale * (0.8 * x1 - 0.3 * x2 + bonus) + rng.normal(scale=0.05 * scale, size=rows)
    return pd.DataFrame({"x1": x1, "x2": x2, "kind": kind, "y": y.round(2)})


def classification_frame(rows: int, seed: int = 0, classes: tuple[str, ...] = ("low", "high")) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=rows), rng.normal(size=rows)
    label = np.where(x1 + x2 > 0, classes[1], classes[0])
    return pd.DataFrame({"x1": x1.round(3), "x2": x2.round(3), "color": rng.choice(["red", "blue"], size=rows),
                         "label": label})


def run(spec: Path, run_id: str, until: str | None = None, **params: Any) -> RunResult:
    return run_all(make_context(spec, run_id, {**FAST, **params}), until=until)


@pytest.fixture
def serving(tmp_path: Path):
    """Model servers started by a test's deploy steps are stopped after it."""
    from conftest import stop_model_servers

    from kiln.tasks.settings import get_settings

    yield
    stop_model_servers(get_settings().serving_dir)


@pytest.mark.parametrize(("name", "scale", "offset"), [("rent_in_thousands", 900.0, 4200.0),
                                                       ("temperature_near_fifty", 4.0, 50.0)],
                         ids=["target-in-thousands", "target-around-50"])
def test_a_regression_model_deploys_with_the_default_tolerance(tmp_path: Path, serving: None, name: str,
                                                               scale: float, offset: float) -> None:
    """float32 rounds a value in the thousands by about 1e-4: parity is judged relative to the value's size."""
    spec = write_pipeline(tmp_path, name, regression_frame(240, scale, offset), "y", "regression")
    result = run(spec, "first", epochs=8)
    assert not result.skipped, result.skipped
    infra = result[keys.INFRA_VALIDATE]
    assert infra.passed and infra.max_diff is not None and infra.max_diff <= 1e-5, infra
    assert "relative" in infra.to_dict()["compared"]
    verified = result[keys.VERIFY]
    assert verified.passed and verified.details["max_diff"] <= 1e-5
    assert result[keys.PROMOTE].champion == result[keys.REGISTER].version


def test_missing_target_values_are_dropped_and_counted(tmp_path: Path) -> None:
    df = classification_frame(200)
    df.loc[df.index[::10], "label"] = None  # 20 of 200 rows: within the default share
    spec = write_pipeline(tmp_path, "partly_labelled", df, "label", "classification")
    result = run(spec, "r", until=keys.EVALUATE)
    assert result[keys.VALIDATE].success
    cleaned = result[keys.CLEAN]
    assert (cleaned.missing_target, cleaned.rows_out) == (20, 180)
    assert result[keys.EVALUATE].metrics["test/accuracy"] > 0.6


def test_too_many_missing_targets_stop_at_validate(tmp_path: Path) -> None:
    df = classification_frame(200)
    df.loc[df.index % 5 < 3, "label"] = None  # 120 of 200: more than the default share of 0.5
    spec = write_pipeline(tmp_path, "mostly_unlabelled", df, "label", "classification")
    with pytest.raises(DataValidationError, match=r"expect_column_values_to_not_be_null column 'label': 120 "
                                                  r"unexpected values.*max_missing_target_share \(0\.5\)"):
        run(spec, "r", until=keys.VALIDATE)


def test_mostly_duplicate_rows_stop_at_clean_unless_duplicates_are_kept(tmp_path: Path) -> None:
    """Counts of identical records are real data: dropping them must not silently leave 20 rows to train on."""
    distinct = classification_frame(20)
    df = distinct.loc[distinct.index.repeat(40)].reset_index(drop=True)  # 800 rows, 20 distinct
    spec = write_pipeline(tmp_path, "repeated_records", df, "label", "classification")
    with pytest.raises(CleanError, match=r"cleaning kept 20 of 800 rows \(drop_duplicates dropped 780\); 97\.5% "
                                         r"dropped is more than cleaning.max_dropped_share \(0\.5\).*"
                                         r"cleaning.drop_duplicates: false"):
        run(spec, "dropped", until=keys.CLEAN)

    kept = write_pipeline(tmp_path, "repeated_records_kept", df, "label", "classification",
                          cleaning={"drop_duplicates": False})
    result = run(kept, "kept", until=keys.TRAIN)
    assert result[keys.CLEAN].rows_out == 800 and result[keys.TRAIN].final["val/loss"] > 0


def test_a_column_of_numbers_with_some_text_stops_at_validate(tmp_path: Path) -> None:
    df = classification_frame(200)
    weight = df["x1"].abs().round(2).astype(str)
    weight.iloc[[3, 50, 99]] = ["unknown", "12kg", "unknown"]
    df["weight"] = weight
    spec = write_pipeline(tmp_path, "weights", df, "label", "classification")
    with pytest.raises(DataValidationError) as raised:
        run(spec, "r", until=keys.VALIDATE)
    message = str(raised.value)
    assert "expect_column_values_to_match_regex column 'weight': 3 unexpected values" in message
    assert "'unknown'" in message and "'12kg'" in message and "declare it categorical" in message

    declared = write_pipeline(tmp_path, "weights_declared", df, "label", "classification",
                              columns={"weight": "categorical"})
    assert run(declared, "r", until=keys.VALIDATE)[keys.VALIDATE].success


def test_a_header_line_repeated_inside_the_data_stops_at_validate(tmp_path: Path) -> None:
    spec = write_pipeline(tmp_path, "concatenated", classification_frame(100), "label", "classification")
    csv = spec.parent / "concatenated.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join([*lines[:51], lines[0], *lines[51:]]) + "\n")  # two exports pasted together
    with pytest.raises(DataValidationError) as raised:
        run(spec, "r", until=keys.VALIDATE)
    message = str(raised.value)
    assert "expect_column_values_to_not_be_in_set column 'label': 1 unexpected values, e.g. ['label']" in message
    assert "header line repeated inside the data" in message
    assert "column 'x1'" in message and "['x1']" in message  # the numeric columns show it too


def test_a_target_class_the_champion_never_saw_stops_unless_allowed(tmp_path: Path) -> None:
    spec = write_pipeline(tmp_path, "ripeness", classification_frame(200), "label", "classification",
                          deployment={"strategy": "none"})
    first = run(spec, "first")
    assert first[keys.PROMOTE].champion == first[keys.REGISTER].version

    df = classification_frame(200, seed=1)
    df.loc[df.index[:15], "label"] = "rotten"
    spec = write_pipeline(tmp_path, "ripeness", df, "label", "classification", deployment={"strategy": "none"})
    with pytest.raises(DataValidationError, match=r"expect_column_values_to_be_in_set column 'label': 15 unexpected "
                                                  r"values, e.g. \['rotten'.*never trained on"):
        run(spec, "new_class", until=keys.VALIDATE)

    allowed = write_pipeline(tmp_path, "ripeness", df, "label", "classification", deployment={"strategy": "none"},
                             expectations={"allow_new_classes": True})
    assert run(allowed, "allowed", until=keys.VALIDATE)[keys.VALIDATE].success


def test_bad_data_is_a_data_error_that_is_not_retried() -> None:
    from kiln.tasks.features.column_types import SchemaError
    from kiln.tasks.steps.ingest import IngestError

    assert all(issubclass(e, DataError) for e in (IngestError, CleanError, SchemaError, DataValidationError))


def _kiln(*argv: str, home: Path, pipelines: Path) -> subprocess.CompletedProcess[str]:
    """``kiln`` as a user runs it: no Airflow settings of this test session, a KILN_HOME of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "KILN_"))}
    env.update(KILN_HOME=str(home), KILN_PIPELINES_DIR=str(pipelines), KILN_SERVE_PORT=os.environ["KILN_SERVE_PORT"])
    kiln = Path(sys.executable).parent / "kiln"
    return subprocess.run([str(kiln), *argv, "--log", str(home / "run.log")] if argv[0] == "run" else
                          [str(kiln), *argv], env=env, capture_output=True, text=True, timeout=600)


def test_a_fresh_kiln_home_runs_and_an_empty_source_fails_once_with_its_message(tmp_path: Path) -> None:
    """`kiln run` on a KILN_HOME nobody set up: Airflow's DB is made on first use; bad data fails without retry
    and the summary says why, not only which task."""
    pipelines, home = tmp_path / "pipelines", tmp_path / "home"
    write_pipeline(pipelines, "empty", classification_frame(0), "label", "classification")
    done = _kiln("run", "empty", home=home, pipelines=pipelines)
    assert done.returncode == 1, done.stderr[-3000:]
    out = done.stdout
    assert "failed at       ingest: IngestError: source" in out and "has no data rows" in out, out
    assert "not run         validate, clean, build_features" in out
    summary = yaml.safe_load(out.strip().splitlines()[-1])
    assert summary["failed_tasks"] == ["ingest"] and summary["error"]["task"] == "ingest"
    with sqlite3.connect(home / "airflow" / "airflow.db") as db:
        tries = db.execute("SELECT try_number, state FROM task_instance WHERE task_id = 'ingest'").fetchall()
    assert tries == [(1, "failed")], "bad data fails at once, without a retry"


def test_a_spec_typo_is_one_clean_line(tmp_path: Path) -> None:
    pipelines = tmp_path / "pipelines"
    spec = write_pipeline(pipelines, "churn", classification_frame(50), "label", "classification")
    spec.write_text(spec.read_text().replace("task: classification", "task: classification\ntrainig: {epochs: 3}"))
    done = _kiln("run", "churn", home=tmp_path / "home", pipelines=pipelines)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"kiln run: invalid pipeline spec {spec}: field 'trainig': unknown field 'trainig'; did you mean "
        "'training'? allowed: name, description, owner, team, tags, schedule, asset, source, target, task, columns, "
        "sample_fraction, expectations, cleaning, features, model, training, evaluation, deployment, cache, code, "
        "monitoring, scoring, tuning"]
