"""The monitor DAG through real Airflow (``dag.test()``: metadata DB, task instances, XCom, Asset events) with a
real MLflow registry: shifted traffic of the served champion is a breach; the retrain task records the request and
emits the retrain Asset event, which queues a run of the pipeline DAG (scheduled on it by the real factory), and a
further event before that run starts folds into it; the report lands in the champion's MLflow run. A second breach
inside the cool-down emits nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from monitor_fixtures import capture_table, feedback_table, make_baseline, publish, train_and_live

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NAME = "monitored_penguins"
RETRAIN = f"kiln://{NAME}/retrain"


def _setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A pipeline spec with ``on_breach: retrain`` and ``append_labelled``, its champion (version 1 in a real
    MLflow registry, a bundle with a baseline) served per its deployment file, and shifted traffic captured half an
    hour ago, 20 of its rows labelled ten minutes ago."""
    from mlflow import MlflowClient

    from kiln.tasks.bundle.files import BASELINE_FILE, MANIFEST_FILE
    from kiln.tasks.serving.deployment import Deployment, ModelRef, write_deployment
    from kiln.tasks.settings import get_settings
    from kiln.tasks.storage.artifacts import LocalArtifactStore, file_sha256, write_json

    home = tmp_path / "kiln"
    (home / "pipelines").mkdir(parents=True)
    monkeypatch.setenv("KILN_HOME", str(home))
    monkeypatch.setenv("KILN_PIPELINES_DIR", str(home / "pipelines"))
    data = yaml.safe_load((REPO / "dags" / "pipelines" / "penguins_species.yaml").read_text())
    data.update(name=NAME, monitoring={"on_breach": "retrain", "validate_live": False,
                                       "retrain": {"cooldown_hours": 6, "append_labelled": True}})
    (home / "pipelines" / f"{NAME}.yaml").write_text(yaml.safe_dump(data))

    settings = get_settings()
    client = MlflowClient(settings.mlflow_tracking_uri)
    run = client.create_run(client.create_experiment(NAME, artifact_location=f"{settings.mlflow_artifact_root}/x"))
    client.create_registered_model(NAME)
    bundle = tmp_path / "bundle"
    client.create_model_version(NAME, bundle.as_uri(), run_id=run.info.run_id)
    train, live = train_and_live()
    b = make_baseline(bundle, train)
    write_json(bundle / BASELINE_FILE, {"format": 1, "profile": b.profile.to_dict(), "predictions": b.predictions,
                                        "metrics": b.metrics, "sample_rows": b.sample_rows,
                                        "created_at": b.created_at})
    write_json(bundle / MANIFEST_FILE, {"files": {p.name: file_sha256(p) for p in bundle.iterdir()}})
    write_deployment(settings.serving_dir / NAME / "deployment.json",
                     Deployment(model=NAME, champion=ModelRef("1", str(bundle))))

    live = live.copy()
    live["body_mass_g"] = live["body_mass_g"] * 1.3
    live.loc[live.index % 3 == 0, "island"] = "Anvers"
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
    store = LocalArtifactStore(settings.artifact_root)
    table = capture_table(live, version="1", start=start)
    publish(store, f"{NAME}/_capture/version=1/hour={start:%Y-%m-%dT%H}/{start:%Y%m%dT%H%M%S}-0a1b2c3d-000001",
            "capture.parquet", table)
    labelled_at = start + timedelta(minutes=20)
    publish(store, f"{NAME}/_feedback/hour={labelled_at:%Y-%m-%dT%H}/{labelled_at:%Y%m%dT%H%M%S}-0a1b2c3d-000001",
            "feedback.parquet", feedback_table(table.slice(0, 20), ["Adelie"] * 20, labelled_at))
    return run.info.run_id


def test_a_breach_emits_one_retrain_event_that_queues_the_pipeline_and_the_cool_down_holds(
        airflow_db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.assets.manager import AssetManager
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    from airflow.models.asset import AssetDagRunQueue, AssetEvent, AssetModel
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session
    from mlflow import MlflowClient
    from sqlalchemy import select

    from kiln.tasks.monitoring.retrain import load_state
    from kiln.tasks.settings import get_settings
    from kiln.tasks.storage.artifacts import LocalArtifactStore

    run_id = _setup(tmp_path, monkeypatch)
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    assert bag.dags[NAME].timetable.asset_condition.uri == RETRAIN  # the factory's schedule
    # The pipeline DAG in the metadata DB, scheduled on the Asset and unpaused (events queue runs of those only).
    DagBundlesManager().sync_bundles_to_db()
    sync_bag_to_db(bag, bundle_name="dags-folder", bundle_version=None)
    with create_session() as session:
        session.get(DagModel, NAME).is_paused = False
    dr = bag.dags[f"{NAME}_monitor"].test()
    tis = {ti.task_id: ti for ti in dr.get_task_instances()}
    assert {t: str(ti.state) for t, ti in tis.items()} == {"monitor": "success", "retrain": "success"}
    outcome = tis["monitor"].xcom_pull(task_ids="monitor")
    assert outcome["breach"] and outcome["retrain_requested"] and outcome["action"] == "retrain"
    assert "drift on island, body_mass_g" in outcome["summary"]
    store = LocalArtifactStore(get_settings().artifact_root)
    assert load_state(store, NAME).report == outcome["report_key"]
    with create_session() as session:
        asset_id = session.scalar(select(AssetModel.id).where(AssetModel.uri == RETRAIN))
        events = session.scalars(select(AssetEvent).where(AssetEvent.asset_id == asset_id)).all()
        assert [e.extra["kiln_retrain"]["report"] for e in events] == [outcome["report_key"]]
        # append_labelled: the event names the report folder whose labelled.parquet the pipeline's ingest appends.
        assert (outcome["labelled_key"], outcome["labelled_rows"]) == (outcome["report_key"], 20)
        assert {k: events[0].extra["kiln_retrain"][k] for k in ("labelled", "labelled_rows")} == {
            "labelled": outcome["report_key"], "labelled_rows": 20}
        assert (store.path(outcome["report_key"]) / "labelled.parquet").is_file()
        queued = session.scalars(select(AssetDagRunQueue.target_dag_id).where(
            AssetDagRunQueue.asset_id == asset_id)).all()
        assert queued == [NAME]  # the scheduler starts the pipeline's run from this
        # Another event before that run starts (here as the REST API posts one) folds into the same queued run.
        AssetManager.register_asset_change(asset=session.get(AssetModel, asset_id), extra={"by": "hand"},
                                           session=session, source_is_api=True)
        session.flush()
        assert session.scalars(select(AssetDagRunQueue.target_dag_id).where(
            AssetDagRunQueue.asset_id == asset_id)).all() == [NAME]
    stamp = outcome["report_key"].rsplit("/", 1)[-1]
    logged = [f.path for f in MlflowClient(get_settings().mlflow_tracking_uri).list_artifacts(
        run_id, f"monitoring/{stamp}")]
    assert f"monitoring/{stamp}/report.json" in logged and f"monitoring/{stamp}/report.html" in logged
    assert json.loads((store.path(f"{NAME}/_monitor/latest") / "latest.json").read_text())["retrain_requested"]

    again = bag.dags[f"{NAME}_monitor"].test(run_after=datetime.now(UTC) + timedelta(minutes=2))
    tis = {ti.task_id: str(ti.state) for ti in again.get_task_instances()}
    assert tis == {"monitor": "success", "retrain": "skipped"}  # a breach, inside the cool-down
    with create_session() as session:  # the monitor's event and the one by hand: none from the skipped task
        assert len(session.scalars(select(AssetEvent.id).where(AssetEvent.asset_id == asset_id)).all()) == 2
