"""A tuned pipeline through real Airflow (``dag.test()``: the mapped ``trial`` tasks, their leases, XCom): the
grid shows ``study``, one ``trial`` task per trial (a pruned one skipped) and the best trial's ``train``, whose
model is evaluated, gated and served like any other. ``dag.test`` runs the mapped tasks one at a time; trials at
once run on the live platform."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TUNING = {"space": {"training.learning_rate": {"type": "log_uniform", "low": 1e-4, "high": 0.05},
                    "model.hidden_sizes": {"type": "categorical", "choices": [[16], [32, 16]]}},
          "objective": {"metric": "val/accuracy"}, "trials": 4, "parallel": 2, "pruner": "median", "seed": 11}


def test_a_tuned_pipeline_maps_one_task_per_trial_and_serves_the_best(airflow_db, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from mlflow.tracking import MlflowClient

    from kiln.tasks.pipeline.context import make_context
    from kiln.tasks.pipeline.tuned_run import open_run_study
    from kiln.tasks.settings import get_settings

    spec = yaml.safe_load((REPO / "dags" / "pipelines" / "penguins_species.yaml").read_text())
    spec.update(name="penguins_tuned", tuning=TUNING)
    spec["training"].update(epochs=6, nproc=1)
    spec["evaluation"]["thresholds"] = {"accuracy": 0.7}
    spec["evaluation"]["gate"].pop("slices")
    spec.pop("monitoring")
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "penguins_tuned.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("KILN_PIPELINES_DIR", str(pipelines))
    monkeypatch.setenv("KILN_SERVE_PORT", str(free_port()))  # the session's port may hold another test's server

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    dag = bag.dags["penguins_tuned"]
    assert dag.task_dict["trial"].max_active_tis_per_dagrun == 2
    dr = dag.test(run_conf={"tuning_trials": 3})
    tis = dr.get_task_instances()
    trials = sorted((ti for ti in tis if ti.task_id == "trial"), key=lambda ti: ti.map_index)
    assert [ti.map_index for ti in trials] == [0, 1, 2]
    assert [ti.rendered_map_index for ti in trials] == ["trial 0", "trial 1", "trial 2"]
    assert {str(ti.state) for ti in trials} <= {"success", "skipped"} and "success" in {str(t.state) for t in trials}
    others = {ti.task_id: str(ti.state) for ti in tis if ti.task_id != "trial"}
    assert others == dict.fromkeys(["ingest", "validate", "clean", "build_features", "study", "train", "evaluate",
                                    "register", "gate", "infra_validate", "deploy", "verify", "promote"], "success")
    assert str(dr.state) == "success"

    ctx = make_context(pipelines / "penguins_tuned.yaml", dr.run_id)
    study = open_run_study(ctx)
    assert len(study.trials) == 3 and {t.user_attrs["kiln_index"] for t in study.trials} == {0, 1, 2}
    best = next(ti for ti in tis if ti.task_id == "train").xcom_pull(task_ids="train")
    assert best["best_trial"] == study.best_trial.number
    gate = next(ti for ti in tis if ti.task_id == "gate").xcom_pull(task_ids="gate")
    assert gate["passed"] is True
    # The served version was trained by the best trial: its MLflow run holds the study's plots and the best values.
    client = MlflowClient(get_settings().mlflow_tracking_uri)
    tags = client.get_run(best["mlflow_run_id"]).data.tags
    assert tags["kiln.tuning.best_trial"] == str(study.best_trial.number)
    assert {a.path for a in client.list_artifacts(best["mlflow_run_id"], "tuning")} >= {"tuning/study.json"}
