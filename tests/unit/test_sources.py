"""Unit tests of the source readers: folders of partitions, CSV types settled from every value, row groups, the
sample, incremental ingest from the last accepted snapshot, the trigger event check, and SQL on SQLite."""

from __future__ import annotations

import gzip
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from kiln.tasks.pipeline.accepted import ACCEPTED_FILE, PROFILE_FILE, accepted_key
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.pipeline.keys import SNAPSHOT_FILE, SNAPSHOT_MANIFEST_FILE
from kiln.tasks.sources import files, snapshot
from kiln.tasks.sources.listing import SourceListing, list_source
from kiln.tasks.spec import SourceSpec, load_spec
from kiln.tasks.steps.ingest import IngestConfig, IngestError, IngestRun, ingest, run_ingest
from kiln.tasks.storage.artifacts import LocalArtifactStore, file_sha256, write_json


def run(tmp_path: Path, source: SourceSpec, out: str = "out", fraction: float = 1.0, **kwargs) -> tuple:
    out_dir = tmp_path / out
    out_dir.mkdir()
    result = run_ingest(IngestConfig(source, fraction, 7, data_roots=(tmp_path,), pipeline="p"), out_dir,
                        IngestRun(**kwargs))
    return result, out_dir, json.loads((out_dir / SNAPSHOT_MANIFEST_FILE).read_text())


def folder(tmp_path: Path) -> Path:
    parts = tmp_path / "lake"
    (parts / "day=2").mkdir(parents=True)
    (parts / "a.csv").write_text("x,y\n1,p\n2,q\n")
    (parts / "b.csv.gz").write_bytes(gzip.compress(b"x,y\n3,r\n"))
    pd.DataFrame({"x": [4, 5], "y": ["s", "t"]}).to_parquet(parts / "day=2" / "c.parquet")
    (parts / "_SUCCESS").write_text("")
    (parts / ".hidden.csv").write_text("junk\n")
    (parts / "notes.txt").write_text("not data")
    return parts


def test_folder_of_partitions_is_read_in_name_order_and_listed_in_the_manifest(tmp_path):
    parts = folder(tmp_path)
    result, out, manifest = run(tmp_path, SourceSpec(uri=str(parts)))
    snap = pd.read_parquet(out / SNAPSHOT_FILE)
    assert snap["x"].tolist() == [1, 2, 3, 4, 5] and snap["y"].tolist() == ["p", "q", "r", "s", "t"]
    assert [p["name"] for p in manifest["parts"]] == ["a.csv", "b.csv.gz", "day=2/c.parquet"]
    listing = list_source(SourceSpec(uri=str(parts)), (tmp_path,))
    assert manifest["parts"] == [{**p.to_dict(), "sha256": p.etag} for p in listing.parts]
    assert manifest["source_sha256"] == manifest["listing_fingerprint"] == listing.fingerprint()
    assert SourceListing.from_dict(json.loads(json.dumps(listing.to_dict()))) == listing
    assert result.columns == {"x": "int64", "y": "str"}


def test_a_partition_with_other_columns_is_named(tmp_path):
    parts = folder(tmp_path)
    (parts / "z.csv").write_text("x,w\n6,u\n")
    with pytest.raises(IngestError) as info:
        run(tmp_path, SourceSpec(uri=str(parts)))
    assert "z.csv" in str(info.value) and "extra column(s) w" in str(info.value)
    assert "missing column(s) y" in str(info.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_partition_with_another_column_type_is_named(tmp_path):
    parts = tmp_path / "lake"
    parts.mkdir()
    pd.DataFrame({"x": [1]}).to_parquet(parts / "a.parquet")
    pd.DataFrame({"x": ["text"]}).to_parquet(parts / "b.parquet")
    pattern = r"partition .*b\.parquet: column x is (large_)?string where .*a\.parquet has int64"
    with pytest.raises(IngestError, match=pattern):
        run(tmp_path, SourceSpec(uri=str(parts)))


@pytest.mark.parametrize(("late", "dtype"), [("abc", "str"), ("2.5", "float64"), ("", "float64"), ("7", "int64")],
                         ids=["text-late", "float-late", "missing-late", "int-throughout"])
def test_csv_types_come_from_every_value_even_late_ones(tmp_path, monkeypatch, late, dtype):
    monkeypatch.setattr(files, "BLOCK_SIZE", 256)  # many blocks: the late value is in the last one
    (tmp_path / "d.csv").write_text("n,flag\n" + "".join(f"{i},True\n" for i in range(500)) + f"{late},False\n")
    result, out, _ = run(tmp_path, SourceSpec(uri=str(tmp_path / "d.csv")))
    assert result.rows == 501 and result.columns == {"n": dtype, "flag": "bool"}
    expected = pd.read_csv(tmp_path / "d.csv")
    pd.testing.assert_frame_equal(pd.read_parquet(out / SNAPSHOT_FILE), expected)


def test_csv_partitions_share_their_types(tmp_path):
    (tmp_path / "lake").mkdir()
    (tmp_path / "lake" / "a.csv").write_text("x,y\n1,2\n")
    (tmp_path / "lake" / "b.csv").write_text("x,y\n2.5,\n")
    result, out, _ = run(tmp_path, SourceSpec(uri=str(tmp_path / "lake")))
    assert result.columns == {"x": "float64", "y": "float64"}
    assert pd.read_parquet(out / SNAPSHOT_FILE)["x"].tolist() == [1.0, 2.5]


def test_snapshot_row_groups_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(snapshot, "ROW_GROUP_ROWS", 100)
    (tmp_path / "d.csv").write_text("i\n" + "".join(f"{i}\n" for i in range(1050)))
    _, out, _ = run(tmp_path, SourceSpec(uri=str(tmp_path / "d.csv")))
    meta = pq.ParquetFile(out / SNAPSHOT_FILE).metadata
    assert meta.num_rows == 1050 and meta.num_row_groups == 11
    assert max(meta.row_group(i).num_rows for i in range(meta.num_row_groups)) == 100


@pytest.mark.parametrize("fraction", [1.0, 0.5], ids=["whole", "sampled"])
def test_snapshot_row_groups_can_be_made_smaller(tmp_path, fraction):
    (tmp_path / "d.csv").write_text("i\n" + "".join(f"{i}\n" for i in range(1050)))
    (tmp_path / "out").mkdir()
    config = IngestConfig(SourceSpec(uri=str(tmp_path / "d.csv")), fraction, 7, data_roots=(tmp_path,),
                          row_group_rows=200)
    result = run_ingest(config, tmp_path / "out")
    meta = pq.ParquetFile(tmp_path / "out" / SNAPSHOT_FILE).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sum(sizes) == result.rows and sizes[:-1] == [200] * (len(sizes) - 1) and 0 < sizes[-1] <= 200


def test_snapshot_row_groups_must_hold_a_row():
    with pytest.raises(ValueError, match="row_group_rows must be at least 1"):
        IngestConfig(SourceSpec(uri="d.csv"), row_group_rows=0)


def test_sample_is_pandas_seeded_sample(tmp_path):
    (tmp_path / "d.csv").write_text("i\n" + "".join(f"{i}\n" for i in range(1000)))
    _, out, _ = run(tmp_path, SourceSpec(uri=str(tmp_path / "d.csv")), fraction=0.37)
    expected = pd.read_csv(tmp_path / "d.csv").sample(frac=0.37, random_state=7).sort_index()
    assert pd.read_parquet(out / SNAPSHOT_FILE)["i"].tolist() == expected["i"].tolist()


def accept(store: LocalArtifactStore, pipeline: str, run_key: str) -> None:
    """Publish ``run_key``'s snapshot as the accepted one (what validate does when it passes)."""
    manifest = json.loads((store.path(f"{run_key}/ingest") / SNAPSHOT_MANIFEST_FILE).read_text())
    with store.writer(accepted_key(pipeline)) as out:
        write_json(out / ACCEPTED_FILE, {"run_key": run_key, "manifest": manifest, "accepted_at": "now"})
        write_json(out / PROFILE_FILE, {})


@pytest.mark.parametrize("mode", ["append", "new_only"])
def test_incremental_reads_only_new_partitions_after_the_accepted_snapshot(tmp_path, mode):
    spec_path = tmp_path / "p.yaml"
    (tmp_path / "lake").mkdir()
    (tmp_path / "lake" / "1.csv").write_text("x,y\n1,a\n2,b\n")
    spec_path.write_text(json.dumps({"name": "p", "target": "y", "task": "classification",
                                     "source": {"uri": "lake", "incremental": mode}}))
    spec, store = load_spec(spec_path), LocalArtifactStore(tmp_path / "store")

    def ctx(run_id: str) -> RunContext:
        return RunContext(spec=spec, run_key=f"p/{run_id}", store=store, spec_path=str(spec_path))

    first = ingest(ctx("r1"))
    assert first.rows == 2
    accept(store, "p", "p/r1")
    with pytest.raises(IngestError, match=r"nothing to ingest: no part under .*lake is new .*run p/r1"):
        ingest(ctx("r2"))
    assert not store.exists("p/r2/ingest")
    assert file_sha256(store.path("p/r1/ingest") / SNAPSHOT_FILE) == first.sha256  # the previous one untouched
    (tmp_path / "lake" / "2.csv").write_text("x,y\n3,c\n")
    assert ingest(ctx("r3")).rows == (3 if mode == "append" else 1)
    manifest = json.loads((store.path("p/r3/ingest") / SNAPSHOT_MANIFEST_FILE).read_text())
    assert [p["name"] for p in manifest["parts"]] == ["2.csv"]
    assert [p["name"] for p in manifest["ingested_parts"]] == ["1.csv", "2.csv"]
    assert manifest["incremental"]["previous_run"] == "p/r1"
    snap = pd.read_parquet(store.path("p/r3/ingest") / SNAPSHOT_FILE)
    assert snap["x"].tolist() == ([1, 2, 3] if mode == "append" else [3])
    accept(store, "p", "p/r3")
    with pytest.raises(IngestError, match="nothing to ingest"):  # 1.csv stays ingested under new_only too
        ingest(ctx("r4"))
    (tmp_path / "lake" / "1.csv").write_text("x,y\n1,a\n2,z\n")  # a corrected delivery under the same name
    if mode == "new_only":
        ingest(ctx("r5"))
        assert pd.read_parquet(store.path("p/r5/ingest") / SNAPSHOT_FILE)["y"].tolist() == ["a", "z"]
    else:  # appending it would hold both versions of its rows
        with pytest.raises(IngestError, match=r"1\.csv was rewritten since the accepted snapshot of run p/r3 .*"
                                              r"incremental: off"):
            ingest(ctx("r5"))
        assert not store.exists("p/r5/ingest")


def test_trigger_event_parts_must_still_be_as_announced(tmp_path):
    (tmp_path / "lake").mkdir()
    (tmp_path / "lake" / "1.csv").write_text("x\n1\n")
    source = SourceSpec(uri=str(tmp_path / "lake"))
    part = list_source(source, (tmp_path,)).parts[0].to_dict()
    _, _, manifest = run(tmp_path, source, trigger_events=({"uri": source.uri, "parts": [part]},))
    assert manifest["trigger"] == {"parts": [part]}
    (tmp_path / "lake" / "1.csv").write_text("x\n2\n")
    with pytest.raises(IngestError, match=r"1\.csv changed after the Asset event .*ETag"):
        run(tmp_path, source, out="o2", trigger_events=({"uri": source.uri, "parts": [part]},))
    gone = {**part, "name": "0.csv"}
    with pytest.raises(IngestError, match=r"0\.csv started this run .* no longer in the source"):
        run(tmp_path, source, out="o3", trigger_events=({"parts": [gone]},))


@pytest.fixture
def sqlite_db(tmp_path: Path) -> str:
    db = tmp_path / "db.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (id INTEGER, price NUMERIC, label TEXT, at TEXT)")
        conn.executemany("INSERT INTO t VALUES (?, ?, ?, ?)",
                         [(i, i * 1.5, "ab"[i % 2], f"2026-01-0{1 + i % 3} 00:00:00+00:00") for i in range(12)])
    return f"sqlite:///{db}"


def sql(query: str, **kw) -> SourceSpec:
    return SourceSpec(sql={"conn_id": "db", "query": query, **kw})


def test_sql_source_binds_the_interval_and_records_the_query(tmp_path, sqlite_db):
    query = ("SELECT id, price, label FROM t WHERE at >= :data_interval_start AND at < :data_interval_end "
             "ORDER BY id")
    interval = (datetime(2026, 1, 2, tzinfo=UTC), datetime(2026, 1, 3, tzinfo=UTC))
    result, out, manifest = run(tmp_path, sql(query), data_interval=interval, connection_url=lambda _: sqlite_db)
    assert pd.read_parquet(out / SNAPSHOT_FILE)["id"].tolist() == [1, 4, 7, 10]
    assert result.columns == {"id": "int64", "price": "float64", "label": "str"}
    assert result.source_uri == "sql://db/p"
    assert manifest["sql"] == {"conn_id": "db", "query": query, "rows": 4, "parameters": {
        "data_interval_start": "2026-01-02T00:00:00+00:00", "data_interval_end": "2026-01-03T00:00:00+00:00"}}


def test_sql_source_without_interval_binds_epoch_and_now(tmp_path, sqlite_db):
    now = datetime(2026, 1, 2, 12, tzinfo=UTC)
    _, _, manifest = run(tmp_path, sql("SELECT id FROM t WHERE at < :data_interval_end AND :data_interval_start "
                                       "< at"), connection_url=lambda _: sqlite_db, started_at=now)
    assert manifest["sql"]["parameters"] == {"data_interval_start": "1970-01-01T00:00:00+00:00",
                                             "data_interval_end": "2026-01-02T12:00:00+00:00"}
    assert manifest["rows"] == 8


def lookup_fails(conn_id: str) -> str:
    raise LookupError(f"no Airflow connection '{conn_id}': add it")


@pytest.mark.parametrize(("source", "resolver", "needles"), [
    (sql("SELECT id FROM t WHERE id > 100"), None, ["returned no rows", "connection 'db'"]),
    (sql("SELECT nope FROM t"), None, ["source.sql.query failed on connection 'db'", "no such column: nope"]),
    (sql("SELECT id FROM t", max_rows=5), None, ["more than source.sql.max_rows = 5"]),
    (sql("SELECT id FROM t WHERE id > :lo"), None, ["parameter(s) :lo"]),
    (sql("SELECT id FROM t"), lookup_fails, ["source.sql.conn_id", "no Airflow connection 'db'"]),
    (sql("SELECT id FROM t"), lambda _: "mysql+pymysql://u@127.0.0.1/db", ["needs the database driver 'pymysql'"]),
], ids=["empty-result", "sql-error", "too-many-rows", "unknown-parameter", "missing-connection", "missing-driver"])
def test_sql_bad_input(tmp_path, sqlite_db, source, resolver, needles):
    with pytest.raises(IngestError) as info:
        run(tmp_path, source, connection_url=resolver or (lambda _: sqlite_db))
    for needle in needles:
        assert needle in str(info.value)
    assert list((tmp_path / "out").iterdir()) == []
