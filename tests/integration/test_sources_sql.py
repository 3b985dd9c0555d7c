"""SQL sources on the local PostgreSQL through a real Airflow connection (``AIRFLOW_CONN_<ID>``, resolved by
``kiln.operators.connections.connection_url`` as in a task), with the run's data interval in the query."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
from airflow_service import temporary_postgres_database

from kiln.operators.connections import connection_url
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.pipeline.keys import SNAPSHOT_FILE, SNAPSHOT_MANIFEST_FILE
from kiln.tasks.spec import load_spec
from kiln.tasks.steps.ingest import IngestError, ingest
from kiln.tasks.storage.artifacts import LocalArtifactStore

pytestmark = [pytest.mark.integration]

QUERY = ("SELECT id, amount, label, created_at FROM sales WHERE created_at >= :data_interval_start "
         "AND created_at < :data_interval_end ORDER BY id")
INTERVAL = (datetime(2026, 3, 2, tzinfo=UTC), datetime(2026, 3, 3, tzinfo=UTC))


@pytest.fixture(scope="module")
def warehouse() -> Iterator[str]:
    """A fresh database with 30 sales over three days; yields its Airflow connection URI."""
    import sqlalchemy as sa

    with temporary_postgres_database(prefix="kiln_src_") as url:
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE sales (id int, amount numeric(10, 2), label text, "
                                 "created_at timestamptz)"))
            conn.execute(sa.text("INSERT INTO sales SELECT i, i * 1.25, CASE WHEN i % 2 = 0 THEN 'a' ELSE 'b' END, "
                                 "timestamptz '2026-03-01 00:00+00' + (i / 10) * interval '1 day' "
                                 "+ (i % 10) * interval '1 hour' FROM generate_series(0, 29) AS i"))
        engine.dispose()
        yield url.replace("postgresql+psycopg2://", "postgres://")


def context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uri: str, query: str = QUERY,
            conn_id: str = "kiln_sales", **run) -> RunContext:
    monkeypatch.setenv("AIRFLOW_CONN_KILN_SALES", uri)
    spec_path = tmp_path / "p.yaml"
    spec_path.write_text(json.dumps({"name": "sales", "target": "label", "task": "classification",
                                     "source": {"sql": {"conn_id": conn_id, "query": query}}}))
    return RunContext(spec=load_spec(spec_path), run_key="sales/r1", store=LocalArtifactStore(tmp_path / "store"),
                      spec_path=str(spec_path), connection_url=connection_url, **run)


def test_query_reads_the_runs_data_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warehouse: str) -> None:
    ctx = context(tmp_path, monkeypatch, warehouse, data_interval=INTERVAL)
    result = ingest(ctx)
    snap = pd.read_parquet(ctx.input_dir("ingest") / SNAPSHOT_FILE)
    assert snap["id"].tolist() == list(range(10, 20)) and result.rows == 10
    assert snap["amount"].tolist() == [i * 1.25 for i in range(10, 20)]
    assert str(snap["created_at"].dt.tz) == "UTC"
    manifest = json.loads((ctx.input_dir("ingest") / SNAPSHOT_MANIFEST_FILE).read_text())
    assert manifest["source_uri"] == "sql://kiln_sales/sales" and manifest["source_kind"] == "sql"
    assert manifest["sql"] == {"conn_id": "kiln_sales", "query": QUERY, "rows": 10, "parameters": {
        "data_interval_start": "2026-03-02T00:00:00+00:00", "data_interval_end": "2026-03-03T00:00:00+00:00"}}
    assert "postgres://" not in json.dumps(manifest)  # the connection's URL stays out of the manifest


@pytest.mark.parametrize(("query", "conn_id", "needles"), [
    (QUERY, "kiln_sales", ["returned no rows", "data_interval_start=2030-01-01"]),
    ("SELECT missing_column FROM sales", "kiln_sales", ["source.sql.query failed on connection 'kiln_sales'",
                                                        "missing_column"]),
    (QUERY, "kiln_no_such_conn", ["source.sql.conn_id", "no Airflow connection 'kiln_no_such_conn'"]),
], ids=["empty-result", "sql-error", "missing-connection"])
def test_bad_sql_input_names_the_connection_and_publishes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warehouse: str, query: str, conn_id: str,
        needles: list[str]) -> None:
    ctx = context(tmp_path, monkeypatch, warehouse, query=query, conn_id=conn_id,
                  data_interval=(datetime(2030, 1, 1, tzinfo=UTC), datetime(2030, 1, 2, tzinfo=UTC)))
    with pytest.raises(IngestError) as info:
        ingest(ctx)
    for needle in needles:
        assert needle in str(info.value)
    assert not ctx.store.exists(ctx.key("ingest"))
