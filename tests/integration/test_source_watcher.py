"""The source watcher on real Airflow (api-server, scheduler, dag-processor, triggerer) and the loopback S3: a new
object under the watched prefix starts exactly one run, which reads that object; a triggerer restart repeats
nothing, and an object added while the triggerer was down starts one run after it is back. A SQL source's
watermark, read through an Airflow connection from the triggerer, starts one run when it grows.

The DAG (``tests/service_dags/source_watch.py``) has the pipeline's real schedule (``kiln_pipelines._schedule``:
the Asset of the watched source with its ``SourceChangeTrigger``) and one task that reads what the events name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from airflow_service import AirflowService
from conftest import REPO
from s3_server import AWS_ENV, S3Endpoint, s3_endpoint  # noqa: F401

from kiln.tasks.processes import stop_groups
from kiln.tasks.sources.watch import WatchState, load_state
from kiln.tasks.storage.artifacts import LocalArtifactStore

pytestmark = [pytest.mark.integration, pytest.mark.s3]
log = logging.getLogger(__name__)

INTERVAL_S = 5
PIPELINE = "watched_penguins"
SQL_PIPELINE = "watched_rows"


def _wait(what: str, check: Any, svc: AirflowService, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:.0f} s\n{svc.log_tails(40)}")
        time.sleep(0.5)
    return value


def _runs(svc: AirflowService, dag_id: str = PIPELINE) -> list[dict]:
    body = svc.get(f"/api/v2/dags/{quote(dag_id)}/dagRuns", params={"order_by": "run_after", "limit": 50})
    return body["dag_runs"]


def _committed(store: LocalArtifactStore, name: str) -> bool:
    state: WatchState | None = load_state(store, PIPELINE)
    return state is not None and state.parts is not None and name in state.parts


def _watermark(store: LocalArtifactStore) -> Any:
    state = load_state(store, SQL_PIPELINE)
    return state.watermark if state is not None else None


def _spec(tmp_path: Path, name: str, source: dict) -> Path:
    data = yaml.safe_load((REPO / "dags" / "pipelines" / "penguins_species.yaml").read_text())
    data.update(name=name, source={**source, "watch": {"interval_s": INTERVAL_S}})
    data.pop("asset", None)
    data.pop("schedule", None)
    path = tmp_path / "spec" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def _database(tmp_path: Path) -> Path:
    path = tmp_path / "rows.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE rows (id INTEGER, species TEXT)")
        conn.execute("INSERT INTO rows VALUES (1, 'Adelie')")
    return path


def _stop_triggerer(svc: AirflowService) -> None:
    """Stop the triggerer's process group (SIGTERM, as a redeploy does); the other components keep running."""
    stop_groups([svc.component_pids["triggerer"]], grace_s=20, children=[svc._service._procs["triggerer"]])


def _read(out: Path, run: dict) -> dict:
    return json.loads((out / f"{run['dag_run_id'].replace(':', '_')}.json").read_text())


def test_new_object_starts_one_run_and_a_triggerer_restart_repeats_none(
        s3_endpoint: S3Endpoint, tmp_path: Path) -> None:  # noqa: F811
    bucket = f"landing-{uuid.uuid4().hex[:8]}"
    s3 = s3_endpoint.client(direct=True)
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="penguins/day=0.csv", Body=b"species,bill\nAdelie,39.1\n")
    spec = _spec(tmp_path, PIPELINE, {"uri": f"s3://{bucket}/penguins/"})
    db = _database(tmp_path)
    sql_spec = _spec(tmp_path, SQL_PIPELINE, {"sql": {"conn_id": "watch_rows", "watermark_column": "id",
                                                      "query": "SELECT id, species FROM rows"}})
    dags, out, home = tmp_path / "dags", tmp_path / "out", tmp_path / "kiln"
    dags.mkdir(), out.mkdir(), (home / "pipelines").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "service_dags" / "source_watch.py", dags)
    env = {**AWS_ENV, "KILN_HOME": str(home), "KILN_PIPELINES_DIR": str(home / "pipelines"),
           "KILN_S3_ENDPOINT_URL": s3_endpoint.url,
           "KILN_WATCH_TEST_SPECS": os.pathsep.join([str(spec), str(sql_spec)]), "KILN_WATCH_TEST_OUT": str(out),
           "KILN_WATCH_TEST_REPO": str(REPO),
           "AIRFLOW_CONN_WATCH_ROWS": json.dumps({"conn_type": "sqlite", "host": str(db)}),
           "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
           # A stopped triggerer's triggers move to the new one once its job is no longer alive.
           "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2", "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "10"}
    store = LocalArtifactStore(home / "artifacts")
    t0 = time.monotonic()
    with AirflowService(dags, parallelism=2, extra_env=env) as svc:
        log.info("services ready after %.1f s", time.monotonic() - t0)
        svc.wait_for_dag(PIPELINE)
        # The first look records what is already there (no run for it).
        _wait("the watcher's baseline", lambda: _committed(store, "day=0.csv"), svc)
        _wait("the SQL watcher's baseline", lambda: _watermark(store) == 1, svc)
        assert _runs(svc) == [] and _runs(svc, SQL_PIPELINE) == []

        s3.put_object(Bucket=bucket, Key="penguins/day=1.csv", Body=b"species,bill\nGentoo,46.1\n")
        with sqlite3.connect(db) as conn:
            conn.execute("INSERT INTO rows VALUES (2, 'Gentoo')")
        [first] = _wait("a run started by the new object", lambda: _runs(svc), svc)
        assert first["run_type"] == "asset_triggered"
        assert svc.wait_for_run(PIPELINE, first["dag_run_id"], timeout=60) == "success"
        record = _read(out, first)
        assert [r["name"] for r in record["read"]] == ["day=1.csv"], record
        assert record["read"][0]["text"] == "species,bill\nGentoo,46.1\n"
        etag = s3.head_object(Bucket=bucket, Key="penguins/day=1.csv")["ETag"].strip('"')
        assert record["extras"][0]["payload"]["parts"] == [{"name": "day=1.csv", "etag": etag, "size": 25}]
        # Saved only once Airflow confirmed the event stored.
        _wait("the change committed to the watcher state", lambda: _committed(store, "day=1.csv"), svc)
        [sql_run] = _wait("a run started by the new row", lambda: _runs(svc, SQL_PIPELINE), svc)
        assert svc.wait_for_run(SQL_PIPELINE, sql_run["dag_run_id"], timeout=60) == "success"
        assert _read(out, sql_run)["read"] == [{"watermark": 2}]

        log.info("first runs done after %.1f s", time.monotonic() - t0)
        _stop_triggerer(svc)
        log.info("triggerer stopped after %.1f s", time.monotonic() - t0)
        s3.put_object(Bucket=bucket, Key="penguins/day=2.csv", Body=b"species,bill\nChinstrap,49.5\n")
        svc._service.start(["triggerer"])  # a new trigger instance, built from the kwargs Airflow stored

        runs = _wait("a run for the object added while the triggerer was down",
                     lambda: r if len(r := _runs(svc)) >= 2 else None, svc, timeout=90)
        assert len(runs) == 2, [r["dag_run_id"] for r in runs]
        log.info("run after the restart seen after %.1f s", time.monotonic() - t0)
        second = runs[-1]
        assert svc.wait_for_run(PIPELINE, second["dag_run_id"], timeout=60) == "success"
        # Only the new object: day=1.csv, already emitted before the restart, is not repeated.
        assert [r["name"] for r in _read(out, second)["read"]] == ["day=2.csv"]
        _wait("the second change committed", lambda: _committed(store, "day=2.csv"), svc)
        # One more look of the restarted watcher starts nothing.
        deadline = time.monotonic() + INTERVAL_S + 1
        while time.monotonic() < deadline:
            assert len(_runs(svc)) == 2, "a run started without new data"
            time.sleep(1)
        assert len(_runs(svc, SQL_PIPELINE)) == 1, "the restarted SQL watcher repeated its watermark"


def test_the_state_is_saved_only_once_airflow_confirms_the_event(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The triggerer's own shared-stream manager (ack mode) drives the trigger: the change's state is committed
    after the supervisor's persist confirmation, not when the event is emitted."""
    import asyncio

    from airflow.triggers.shared_stream import SharedStreamManager

    from kiln.operators.source_trigger import SourceChangeTrigger

    monkeypatch.setenv("KILN_HOME", str(tmp_path / "kiln"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "day=0.csv").write_text("a\n1\n")
    trigger = SourceChangeTrigger(pipeline=PIPELINE, source={"uri": str(data), "watch": {"interval_s": 5}},
                                  spec_dir=str(tmp_path), interval_s=1)
    store = LocalArtifactStore(tmp_path / "kiln" / "artifacts")

    async def drive() -> None:
        manager, key = SharedStreamManager(), trigger.shared_stream_key()
        events = trigger.filter_shared_stream(manager.subscribe(trigger_id=1, trigger=trigger, key=key))
        waiter = asyncio.ensure_future(anext(events))
        while not _committed(store, "day=0.csv"):  # the baseline (no event) is saved at once
            await asyncio.sleep(0.1)
        (data / "day=1.csv").write_text("a\n2\n")
        event = await asyncio.wait_for(waiter, timeout=30)
        assert [p["name"] for p in event.payload["parts"]] == ["day=1.csv"]
        seq = manager.bind_pending_event(trigger_id=1, key=key)
        assert seq is not None, "the trigger does not run in ack mode"
        waiter = asyncio.ensure_future(anext(events))  # the subscriber moves past the event
        await asyncio.sleep(1.0)
        assert not _committed(store, "day=1.csv"), "state saved before Airflow confirmed the event stored"
        manager.confirm_persisted([seq])
        for _ in range(100):
            if _committed(store, "day=1.csv"):
                break
            await asyncio.sleep(0.1)
        assert _committed(store, "day=1.csv"), "state not saved after the confirmation"
        waiter.cancel()
        await manager.stop_all()

    asyncio.run(drive())
