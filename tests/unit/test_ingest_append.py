"""A retrain event naming labelled rows (``kiln_retrain.labelled``, monitoring.retrain.append_labelled): ``ingest``
appends them to the source's snapshot, cast to the snapshot's types, and the manifest says what was appended; a
label that does not fit, a missing file or too many rows fail the step with nothing left behind. Real files and a
real local artifact store."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from monitor_fixtures import TARGET, capture_table, feedback_table, penguins

from kiln.tasks.monitoring.labelled import LABELLED_FILE, MAX_LABELLED_ROWS, export_labelled
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.pipeline.keys import SNAPSHOT_FILE, SNAPSHOT_MANIFEST_FILE
from kiln.tasks.spec import SourceSpec, load_spec
from kiln.tasks.steps.ingest import IngestConfig, IngestError, IngestRun, ingest, run_ingest
from kiln.tasks.storage.artifacts import LocalArtifactStore, file_sha256

CSV = "a,b,c,y\n1,2.5,p,0\n3,4.5,q,1\n5,6.5,p,1\n7,8.5,r,0\n"
KEY = "p/_monitor/20261207T040000"


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "store")


def labelled(store: LocalArtifactStore, table: pa.Table, key: str = KEY) -> str:
    """Publish ``table`` as a monitor report folder's labelled.parquet; returns the key."""
    with store.writer(key) as folder:
        pq.write_table(table, folder / LABELLED_FILE)
    return key


def retrain_event(key: str | None) -> dict:
    return {"kiln_retrain": {"report": KEY, "summary": "drift on a", "labelled": key, "labelled_rows": 2}}


def run(tmp_path: Path, store: LocalArtifactStore | None, *events: dict, out: str = "out") -> tuple:
    (tmp_path / "d.csv").write_text(CSV)
    out_dir = tmp_path / out
    out_dir.mkdir()
    config = IngestConfig(SourceSpec(uri=str(tmp_path / "d.csv")), data_roots=(tmp_path,), pipeline="p")
    result = run_ingest(config, out_dir, IngestRun(trigger_events=events, store=store))
    return result, out_dir, json.loads((out_dir / SNAPSHOT_MANIFEST_FILE).read_text())


def captured(**columns: pa.Array) -> pa.Table:
    """A labelled file as the monitor writes one: captured numbers are float64, text and the label strings."""
    base = {"a": pa.array([9.0, 11.0]), "b": pa.array([1.5, None], pa.float64()),
            "y": pa.array(["1", "0"], pa.string()), "served_by": pa.array(["v1", "v1"])}
    return pa.table({**base, **columns})


def test_labelled_rows_are_appended_with_the_snapshots_types(tmp_path: Path, store) -> None:
    key = labelled(store, captured())  # no column c: nulls; served_by: not a snapshot column, ignored
    result, out, manifest = run(tmp_path, store, retrain_event(key))
    snap = pq.read_table(out / SNAPSHOT_FILE)
    assert snap.schema.names == ["a", "b", "c", "y"]
    assert [str(t) for t in snap.schema.types] == ["int64", "double", "string", "int64"]
    assert snap.to_pydict() == {"a": [1, 3, 5, 7, 9, 11], "b": [2.5, 4.5, 6.5, 8.5, 1.5, None],
                                "c": ["p", "q", "p", "r", None, None], "y": [0, 1, 1, 0, 1, 0]}
    assert manifest["appended"] == [{"key": key, "rows": 2,
                                     "sha256": file_sha256(store.path(key) / LABELLED_FILE)}]
    assert manifest["rows"] == result.rows == 6
    assert manifest["sha256"] == result.sha256 == file_sha256(out / SNAPSHOT_FILE)
    assert manifest["columns"] == run(tmp_path, store, out="plain")[2]["columns"]  # the source's alone
    assert sorted(p.name for p in out.iterdir()) == [SNAPSHOT_MANIFEST_FILE, SNAPSHOT_FILE]  # no scratch left


def test_a_missing_input_in_an_integer_column_stores_it_as_float64(tmp_path: Path, store) -> None:
    key = labelled(store, captured(a=pa.array([9.0, None], pa.float64())))
    result, out, manifest = run(tmp_path, store, retrain_event(key))
    assert pd.read_parquet(out / SNAPSHOT_FILE)["a"].tolist()[:5] == [1.0, 3.0, 5.0, 7.0, 9.0]
    assert manifest["columns"]["a"] == result.columns["a"] == "float64"


def test_events_without_labelled_rows_change_nothing(tmp_path: Path, store) -> None:
    plain, out, manifest = run(tmp_path, None, retrain_event(None), {"by": "hand"})
    assert "appended" not in manifest and plain.rows == 4
    assert pd.read_parquet(out / SNAPSHOT_FILE).equals(pd.read_csv(tmp_path / "d.csv"))


@pytest.mark.parametrize(("table", "column"), [
    ({"y": pa.array(["1", "abc"], pa.string())}, "'y' (string) does not cast to the snapshot's int64"),
    ({"a": pa.array([9.0, 9.5])}, "'a' (double) does not cast to the snapshot's int64"),
], ids=["label-not-an-int", "input-with-a-fraction-into-int"])
def test_a_value_that_does_not_cast_fails_naming_the_column_and_leaves_no_snapshot(tmp_path: Path, store, table,
                                                                                   column) -> None:
    key = labelled(store, captured(**table))
    with pytest.raises(IngestError) as raised:
        run(tmp_path, store, retrain_event(key))
    message = str(raised.value)
    assert f"{key}/{LABELLED_FILE}" in message and column in message and "append_labelled: false" in message
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_a_missing_file_or_no_store_fails_before_reading_the_source(tmp_path: Path, store) -> None:
    with pytest.raises(IngestError, match=r"labelled rows 'p/_monitor/gone'.*not in the artifact store"):
        run(tmp_path, store, retrain_event("p/_monitor/gone"))
    with store.writer("p/_monitor/empty") as folder:
        (folder / "report.json").write_text("{}")
    with pytest.raises(IngestError, match=r"_monitor/empty/labelled.parquet .*no such file"):
        run(tmp_path, store, retrain_event("p/_monitor/empty"), out="o2")
    with pytest.raises(IngestError, match="no artifact store to read them from"):
        run(tmp_path, None, retrain_event(labelled(store, captured())), out="o3")
    for out in ("out", "o2", "o3"):
        assert list((tmp_path / out).iterdir()) == []


def test_more_rows_than_the_bound_are_refused(tmp_path: Path, store) -> None:
    n = MAX_LABELLED_ROWS // 2 + 1
    keys = [labelled(store, pa.table({"a": pa.array([1.0] * n), "y": pa.array(["1"] * n)}), f"p/_monitor/{i}")
            for i in range(2)]
    with pytest.raises(IngestError, match=rf"{2 * n} rows, more than the {MAX_LABELLED_ROWS} a retrain appends"):
        run(tmp_path, store, retrain_event(keys[0]), retrain_event(keys[1]))


def test_the_ingest_step_appends_what_the_monitor_exported(tmp_path: Path, store) -> None:
    """The penguins source and the rows a monitor run exported from captured traffic (year captured as text,
    measurements as float64): the run's snapshot holds both with the source's types."""
    data = penguins()
    (tmp_path / "penguins.csv").write_text(data.to_csv(index=False))
    spec_path = tmp_path / "p.yaml"
    spec_path.write_text(json.dumps({"name": "p", "target": TARGET, "task": "classification",
                                     "source": {"uri": "penguins.csv"}}))
    live = data.dropna().iloc[:6]
    table = capture_table(live)
    with store.writer(KEY) as folder:
        export = export_labelled(folder, table.to_pandas(), feedback_table(table, ["Gentoo"] * 6).to_pandas(),
                                 None, TARGET, None)
    ctx = RunContext(spec=load_spec(spec_path), run_key="p/r1", store=store, spec_path=str(spec_path),
                     trigger_events=(retrain_event(KEY),))
    result = ingest(ctx)
    snap = pd.read_parquet(store.path("p/r1/ingest") / SNAPSHOT_FILE)
    assert export.rows == 6 and result.rows == len(data) + 6 == len(snap)
    assert snap.dtypes.to_dict() == data.dtypes.to_dict()
    pd.testing.assert_frame_equal(snap.iloc[len(data):].drop(columns=[TARGET]).reset_index(drop=True),
                                  live.drop(columns=[TARGET]).reset_index(drop=True))
    assert snap[TARGET].iloc[len(data):].tolist() == ["Gentoo"] * 6
