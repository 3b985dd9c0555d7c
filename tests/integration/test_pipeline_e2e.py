"""Both example pipelines end to end through real Airflow (``dag.test()``: metadata DB, task instances, XCom),
real Great Expectations, a real 2-process torchrun on gloo, MLflow on SQLite, and a real model server."""

from __future__ import annotations

import importlib.resources
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STEPS = ["ingest", "validate", "clean", "build_features", "train", "evaluate", "register", "gate"]
ROLLOUT = ["infra_validate", "deploy", "verify", "promote"]


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
     ("digits_cnn", {"epochs": 3, "sample_fraction": 0.6, "deployment": "none"}, 0.7, 1078)],
    ids=["tabular-mlp-served", "image-cnn-registry-only"],
)
def test_pipeline_runs_end_to_end(airflow_db, dag_id: str, conf: dict, min_accuracy: float, rows: int) -> None:
    from mlflow.tracking import MlflowClient

    from kiln.tasks.settings import get_settings
    from kiln.tasks.storage.artifacts import read_json, run_key

    dr, tis = _run(_bag(), dag_id, conf)
    gated = tis["gate"].xcom_pull(task_ids="gate")
    rollout = "success" if gated["passed"] else "skipped"
    assert {t: str(ti.state) for t, ti in tis.items()} == {**dict.fromkeys(STEPS, "success"),
                                                          **dict.fromkeys(ROLLOUT, rollout)}
    assert str(dr.state) == "success"
    if dag_id == "digits_cnn":  # the spec asks for bootstrap bounds: every threshold check carries one
        assert gated["method"] == "bootstrap"
        assert all(c["bound"] is not None for c in gated["checks"] if c["kind"] == "threshold")
    if dag_id == "penguins_species":  # the first model of a fresh registry passes on thresholds alone
        assert gated["passed"] and gated["champion"] is None and "no champion" in gated["reason"]
        _assert_served(tis, gated["candidate"]["version"])

    evaluated = tis["evaluate"].xcom_pull(task_ids="evaluate")
    assert evaluated["metrics"]["test/accuracy"] >= min_accuracy
    run_dir = Path(get_settings().artifact_root) / run_key(dag_id, dr.run_id)
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
    from kiln.tasks.settings import get_settings
    from kiln.tasks.storage.artifacts import read_json, run_key

    raw = pd.read_csv(importlib.resources.files("palmerpenguins") / "data" / "penguins.csv")
    raw.loc[:9, "body_mass_g"] = 99_999.0  # ten impossible masses
    raw.to_csv(tmp_path / "penguins_bad.csv", index=False)
    spec = yaml.safe_load((REPO / "dags" / "pipelines" / "penguins_species.yaml").read_text())
    spec.update(name="penguins_bad", source={"uri": str(tmp_path / "penguins_bad.csv")})
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "penguins_bad.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("KILN_PIPELINES_DIR", str(pipelines))
    monkeypatch.setenv("KILN_DATA_ROOTS", str(tmp_path))  # the data lies beside the pipelines folder, not in it

    dr, tis = _run(_bag(), "penguins_bad", {"epochs": 1})
    assert str(dr.state) == "failed"
    assert str(tis["ingest"].state) == "success"
    assert str(tis["validate"].state) == "failed"
    assert {str(tis[t].state) for t in STEPS[2:]} == {"upstream_failed"}
    run_dir = Path(get_settings().artifact_root) / run_key("penguins_bad", dr.run_id)
    report = read_json(run_dir / "validate" / "validation.json")
    assert report["success"] is False
    failed = [r for r in report["expectations"] if not r["success"]]
    assert [(r["type"], r["kwargs"]["column"], r["unexpected_count"]) for r in failed] == \
        [("expect_column_values_to_be_between", "body_mass_g", 10)]
    assert sorted(p.name for p in run_dir.iterdir()) == ["ingest", "validate"]
    shutil.rmtree(run_dir)


def _assert_served(tis: dict, version: str) -> None:
    """The deployed endpoint answers raw records with the promoted version's predictions."""
    from kiln.tasks.bundle.load import load_bundle, records_from_frame
    from kiln.tasks.pipeline.endpoint import Endpoint
    from kiln.tasks.serving.auth import resolve_token
    from kiln.tasks.serving.client import ServingClient
    from kiln.tasks.settings import get_settings
    from kiln.tasks.spec import spec_named
    from kiln.tasks.tracking.registry import Registry

    deployed = tis["deploy"].xcom_pull(task_ids="deploy")
    assert Registry(get_settings().mlflow_tracking_uri).champion("penguins_species").version == version
    bundle = load_bundle(Endpoint.of(spec_named("penguins_species")).current().champion.bundle)
    raw, expected = bundle.sample()
    with ServingClient(deployed["url"], resolve_token(get_settings())) as client:
        served = client.predict(records_from_frame(raw.head(5)))
    assert served["version"] == version
    assert [p["label"] for p in served["predictions"]] == list(bundle.format_predictions(expected[:5])[i]["label"]
                                                               for i in range(5))


def test_rejected_candidate_skips_the_rollout(airflow_db) -> None:
    """A crippled training run is gated out: `gate` succeeds with the reason, the rollout is skipped, not failed."""
    from kiln.tasks.settings import get_settings
    from kiln.tasks.tracking.registry import Registry

    registry = Registry(get_settings().mlflow_tracking_uri)
    before = registry.champion("penguins_species")
    dr, tis = _run(_bag(), "penguins_species", {"epochs": 1, "learning_rate": 1e-5})
    gated = tis["gate"].xcom_pull(task_ids="gate")
    assert gated["passed"] is False and "below threshold" in gated["reason"]
    assert {t: str(tis[t].state) for t in ROLLOUT} == dict.fromkeys(ROLLOUT, "skipped")
    assert str(dr.state) == "success"
    after = registry.champion("penguins_species")
    assert (after.version if after else None) == (before.version if before else None)
    assert registry.version("penguins_species", gated["candidate"]["version"]).tags["kiln.gate"] == "failed"


def test_champion_dag_approves_and_rolls_back(airflow_db) -> None:
    """The kiln_champion DAG: an explicit approval serves a gated-out version, a rollback restores the champion."""
    from kiln.tasks.serving.auth import resolve_token
    from kiln.tasks.serving.client import ServingClient
    from kiln.tasks.settings import get_settings
    from kiln.tasks.tracking.registry import Registry

    registry = Registry(get_settings().mlflow_tracking_uri)
    champion = registry.champion("penguins_species")
    others = [v.version for v in registry.versions("penguins_species") if v.version != (champion and champion.version)]
    assert champion is not None and others, "needs the served and the rejected runs of the tests above"

    # A DagBag per run: dag.test() leaves the run's conf in the DAG object's params.
    dr, tis = _run(_bag(), "kiln_champion", {"model": "penguins_species", "action": "approve", "version": others[-1],
                                          "reason": "reviewed by hand"})
    assert str(dr.state) == "success"
    moved = tis["set_champion"].xcom_pull(task_ids="set_champion")
    assert (moved["champion"], moved["previous"]) == (others[-1], champion.version)
    with ServingClient(moved["url"], resolve_token(get_settings())) as client:
        assert client.ready()["champion"]["version"] == others[-1]

        dr, tis = _run(_bag(), "kiln_champion", {"model": "penguins_species", "action": "rollback",
                                              "reason": "approval was a mistake"})
        assert str(dr.state) == "success"
        assert registry.champion("penguins_species").version == champion.version
        assert client.ready()["champion"]["version"] == champion.version
    assert [h["action"] for h in registry.history("penguins_species")][-2:] == ["approve", "rollback"]

    dr, tis = _run(_bag(), "kiln_champion", {"model": "penguins_species", "action": "approve", "version": "999",
                                          "reason": "no such version"})
    assert str(dr.state) == "failed" and str(tis["set_champion"].state) == "failed"
