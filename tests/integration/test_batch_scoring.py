"""Batch scoring with a real registry, a real model server and real Airflow: a 1,000,000-row input scored with the
champion through the real steps (its rejects reported, a sample of its predictions equal to a running model
server's answers for the same rows, an unknown version refused listing the known ones), and the ``<pipeline>_score``
DAG through ``dag.test()``: one leased ``score`` task per partition, the committed manifest and the Asset event."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from serving_fixtures import TARGET, assert_same_predictions, bundle_factory, raw_table, start_server_process  # noqa: F401

from kiln.tasks.features.records import records_from_frame

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NAME = "scored_penguins"
ROWS = 1_000_000
#: Rows of the million the model cannot take: an infinite bill length, a flipper length beyond float32 once scaled.
INFINITE, HUGE = (17, 400_001, 999_999), (5, 250_000)
TOKEN = "batch-scoring-token"


@dataclass(frozen=True)
class Platform:
    home: Path
    spec_path: Path
    million: Path
    bundle: Path


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, bundle_factory) -> Iterator[Platform]:  # noqa: F811
    """A private KILN_HOME with the pipeline's spec, its champion (version 1, a bundle trained in process) in a real
    MLflow registry, and the million-row input under its data folder."""
    from mlflow import MlflowClient

    from kiln.tasks.settings import get_settings
    from kiln.tasks.tracking.registry import Registry

    home = tmp_path_factory.mktemp("scoring") / "kiln"
    (home / "pipelines").mkdir(parents=True)
    (home / "data").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_HOME", str(home))
        mp.setenv("KILN_PIPELINES_DIR", str(home / "pipelines"))
        data = yaml.safe_load((REPO / "dags" / "pipelines" / "penguins_species.yaml").read_text())
        data.pop("monitoring")
        data.update(name=NAME, scoring={"partition_rows": 250_000, "parallel": 2})
        spec_path = home / "pipelines" / f"{NAME}.yaml"
        spec_path.write_text(yaml.safe_dump(data))
        df = raw_table(ROWS, seed=11).drop(columns=[TARGET])
        df.loc[list(INFINITE), "bill_length_mm"] = np.inf
        df.loc[list(HUGE), "flipper_length_mm"] = 1e300
        million = home / "data" / "million.parquet"
        df.to_parquet(million, index=False)
        bundle = bundle_factory(seed=0)
        settings = get_settings()
        client = MlflowClient(settings.mlflow_tracking_uri)
        run = client.create_run(client.create_experiment(NAME))
        client.create_registered_model(NAME)
        client.create_model_version(NAME, bundle.as_uri(), run_id=run.info.run_id)
        Registry(settings.mlflow_tracking_uri).set_champion(NAME, "1", action="approve", reason="test", actor="test")
        yield Platform(home, spec_path, million, bundle)


def _served(platform: Platform, tmp_path: Path, rows: list[dict]) -> list[dict]:
    """What a running model server of the champion answers for ``rows``."""
    from kiln.tasks.serving.deployment import Deployment, ModelRef, write_deployment

    deployment = tmp_path / "deployment.json"
    write_deployment(deployment, Deployment(NAME, ModelRef("1", str(platform.bundle))))
    server = start_server_process(deployment, tmp_path / "server.log", env={"KILN_SERVE_TOKEN": TOKEN})
    try:
        response = httpx.post(f"{server.url}/predict", json={"records": rows}, timeout=30,
                              headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200, response.text
        return response.json()["predictions"]
    finally:
        server.stop()


def test_a_million_rows_are_scored_as_the_server_answers_and_rejects_are_reported(platform: Platform,
                                                                                  tmp_path: Path) -> None:
    from kiln.tasks.scoring import run as steps
    from kiln.tasks.scoring.config import ScoreConfig, ScoringError, output_key
    from kiln.tasks.settings import get_settings
    from kiln.tasks.storage.artifacts import LocalArtifactStore

    spec, config = ScoreConfig.load(platform.spec_path, {"input": {"uri": str(platform.million)}})
    store = LocalArtifactStore(get_settings().artifact_root)
    result = steps.run_score(spec, config, store, "million")
    bad = len(INFINITE) + len(HUGE)
    assert (result.rows, result.scored, result.rejected, result.partitions, result.version) == (
        ROWS, ROWS - bad, bad, 4, "1")
    out = store.path(output_key(config, "million"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == {"version": "1", "champion": True, "bundle": manifest["model"]["bundle"],
                                 "source": platform.bundle.as_uri()}
    rejects = pd.read_parquet(out / "rejects.parquet").sort_values("row")
    assert rejects["row"].tolist() == sorted([*INFINITE, *HUGE])
    reasons = dict(zip(rejects["row"], rejects["reason"], strict=True))
    assert reasons[17] == "expected a finite number or null, found Infinity"
    assert reasons[5].startswith("1e+300 is beyond what the model can take: flipper_length_mm must lie between")

    predictions = pd.concat(pd.read_parquet(out / p["file"]) for p in manifest["partitions"]).set_index("row")
    assert len(predictions) == ROWS - bad and set(predictions["model_version"].astype(str)) == {"1"}
    sample = np.random.default_rng(0).choice(predictions.index.to_numpy(), 200, replace=False)
    raw = pd.read_parquet(platform.million).iloc[sample]
    answers = _served(platform, tmp_path, records_from_frame(raw))
    classes = [c.removeprefix("probability_") for c in predictions.columns if c.startswith("probability_")]
    scored = [{"label": str(row["label"]), "probabilities": {c: float(row[f"probability_{c}"]) for c in classes}}
              for _, row in predictions.loc[sample].iterrows()]
    assert_same_predictions(scored, answers)

    with pytest.raises(ScoringError, match=r"Param 'version': model 'scored_penguins' has no version '9' "
                                           r"\(versions: 1 \(champion\)\); give one of them, or 'champion'"):
        steps.prepare(ScoreConfig.load(platform.spec_path, {"version": "9"})[1], store, "unknown")


def test_the_scoring_dag_maps_one_leased_task_per_partition_and_announces_the_output(
        airflow_db, platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    monkeypatch.setenv("KILN_HOME", str(platform.home))
    monkeypatch.setenv("KILN_PIPELINES_DIR", str(platform.home / "pipelines"))
    small = platform.home / "data" / "small.csv"
    pd.read_parquet(platform.million).head(20_000).to_csv(small, index=False)
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    dag = bag.dags[f"{NAME}_score"]
    assert dag.task_dict["score"].max_active_tis_per_dagrun == 2
    dr = dag.test(run_conf={"input": {"uri": str(small)}, "partition_rows": 5000})
    tis = dr.get_task_instances()
    scored = sorted((ti for ti in tis if ti.task_id == "score"), key=lambda ti: ti.map_index)
    assert [(ti.map_index, str(ti.state)) for ti in scored] == [(i, "success") for i in range(4)]
    assert [ti.rendered_map_index for ti in scored][:2] == ["rows 0..5000", "rows 5000..10000"]
    others = {ti.task_id: str(ti.state) for ti in tis if ti.task_id != "score"}
    assert others == dict.fromkeys(["prepare", "validate", "partition", "commit"], "success")
    committed = next(ti for ti in tis if ti.task_id == "commit").xcom_pull(task_ids="commit")
    assert (committed["rows"], committed["scored"], committed["rejected"], committed["partitions"]) == (
        20_000, 20_000 - 2, 2, 4)  # rows 5 and 17 of the million are in the first 20,000
    assert Path(committed["manifest"].removeprefix("file://")).is_file()
    with create_session() as session:
        asset = session.scalar(select(AssetModel).where(AssetModel.uri == f"kiln://{NAME}/scores"))
        events = session.scalars(select(AssetEvent).where(AssetEvent.asset_id == asset.id)).all()
        assert [e.extra["kiln_scores"]["manifest"] for e in events] == [committed["manifest"]]
