"""Both example pipelines end to end through real Airflow (``dag.test()``: metadata DB, task instances, XCom),
real Great Expectations, a real 2-process torchrun on gloo, and MLflow on SQLite."""

from __future__ import annotations

import importlib.resources
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STEPS = ["ingest", "validate", "clean", "build_features", "train", "evaluate"]


def _bag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    return bag


def _run(bag, dag_id: str, conf: dict):
    dr = bag.dags[dag_id].test(run_conf=conf)
    tis = {ti.task_id: ti for ti in dr.get_task_instances()}
    return dr, tis


@pytest.mark.parametrize(
    ("dag_id", "conf", "min_accuracy", "rows"),
    [("penguins_species", {"epochs": 15}, 0.85, 344),
     ("digits_cnn", {"epochs": 3, "sample_fraction": 0.6}, 0.7, 1078)],
    ids=["tabular-mlp", "image-cnn"],
)
def test_pipeline_runs_end_to_end(airflow_db, dag_id: str, conf: dict, min_accuracy: float, rows: int) -> None:
    from mlflow.tracking import MlflowClient

    from tasks.artifacts import read_json, run_key
    from tasks.settings import get_settings

    dr, tis = _run(_bag(), dag_id, conf)
    assert {t: str(ti.state) for t, ti in tis.items()} == dict.fromkeys(STEPS, "success")
    assert str(dr.state) == "success"

    evaluated = tis["evaluate"].xcom_pull(task_ids="evaluate")
    assert evaluated["metrics"]["test/accuracy"] >= min_accuracy
    run_dir = get_settings().artifact_root / run_key(dag_id, dr.run_id)
    assert read_json(run_dir / "ingest" / "manifest.json")["rows"] == rows
    assert read_json(run_dir / "validate" / "validation.json")["success"] is True
    assert (run_dir / "validate" / "data_docs" / "index.html").is_file()
    assert (run_dir / "evaluate" / "confusion_matrix.png").stat().st_size > 1000
    history = read_json(run_dir / "train" / "train_metrics.json")["history"]
    assert len(history) == conf["epochs"]

    client = MlflowClient(get_settings().mlflow_tracking_uri)
    run = client.get_run(evaluated["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/accuracy"] == pytest.approx(evaluated["metrics"]["test/accuracy"])
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == conf["epochs"]


def test_validation_failure_stops_the_run(airflow_db, tmp_path: Path, monkeypatch) -> None:
    """Bad data fails `validate` with the failed expectations listed; nothing downstream runs or is written."""
    from tasks.artifacts import read_json, run_key
    from tasks.settings import get_settings

    raw = pd.read_csv(importlib.resources.files("palmerpenguins") / "data" / "penguins.csv")
    raw.loc[:9, "body_mass_g"] = 99_999.0  # ten impossible masses
    raw.to_csv(tmp_path / "penguins_bad.csv", index=False)
    spec = yaml.safe_load((REPO / "dags" / "pipelines" / "penguins_species.yaml").read_text())
    spec.update(name="penguins_bad", source={"uri": str(tmp_path / "penguins_bad.csv")})
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "penguins_bad.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("KILN_PIPELINES_DIR", str(pipelines))

    dr, tis = _run(_bag(), "penguins_bad", {"epochs": 1})
    assert str(dr.state) == "failed"
    assert str(tis["ingest"].state) == "success"
    assert str(tis["validate"].state) == "failed"
    assert {str(tis[t].state) for t in STEPS[2:]} == {"upstream_failed"}
    run_dir = get_settings().artifact_root / run_key("penguins_bad", dr.run_id)
    report = read_json(run_dir / "validate" / "validation.json")
    assert report["success"] is False
    failed = [r for r in report["expectations"] if not r["success"]]
    assert [(r["type"], r["kwargs"]["column"], r["unexpected_count"]) for r in failed] == \
        [("expect_column_values_to_be_between", "body_mass_g", 10)]
    assert sorted(p.name for p in run_dir.iterdir()) == ["ingest", "validate"]
    shutil.rmtree(run_dir)
