"""Batch scoring in process over a real bundle (``serving_fixtures.make_bundle``): rows the model server would
refuse go to the rejects with the field and the reason, the manifest names the version, the input and every file
with its sha256, and a run with a failed partition, a bad schema or too many rejects commits nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from serving_fixtures import TARGET, bundle_factory, raw_table  # noqa: F401

from kiln.tasks.bundle.load import load_bundle
from kiln.tasks.features.records import RecordTransform, records_from_frame
from kiln.tasks.features.transform import CategoricalColumn, FeatureTransform, NumericColumn
from kiln.tasks.scoring import run as steps
from kiln.tasks.scoring.commit import MANIFEST_FILE
from kiln.tasks.scoring.config import ScoreConfig, ScoringError, output_key, work_key
from kiln.tasks.scoring.model import ScoringModel
from kiln.tasks.scoring.rows import check_rows
from kiln.tasks.spec import SourceSpec, load_spec
from kiln.tasks.storage.artifacts import LocalArtifactStore, file_sha256

REPO = Path(__file__).resolve().parents[2]
SPEC = load_spec(REPO / "dags" / "pipelines" / "penguins_species.yaml")


def _input(tmp_path: Path, n: int = 3000, **changes: object) -> Path:
    """``n`` raw rows without the label as a Parquet file, ``bill_length_mm`` as text; ``changes`` sets single
    cells (``"col@row": value``)."""
    df = raw_table(n, seed=5).drop(columns=[TARGET])
    df["bill_length_mm"] = [repr(v) for v in df["bill_length_mm"]]  # numbers as text, as a CSV may hold them
    for cell, value in changes.items():
        column, row = cell.split("@")
        df.loc[int(row), column] = value
    path = tmp_path / "batch.parquet"
    df.to_parquet(path, index=False)
    return path


def _config(path: Path, **kwargs: object) -> ScoreConfig:
    return ScoreConfig(pipeline=SPEC.name, source=SourceSpec(uri=str(path)), spec_dir=path.parent,
                       **{"partition_rows": 1000, **kwargs})  # type: ignore[arg-type]


def test_rows_the_server_refuses_are_rejected_with_their_field_and_reason() -> None:
    transform = FeatureTransform("classification", "y", "standard", 10,
                                 (NumericColumn("x", 0.0, 0.0, 1.0), NumericColumn("t", 1.0, 0.0, 2.0)),
                                 (CategoricalColumn("c", ("a", "b")),), ("n", "p"))
    table = pa.table({"id": pa.array([10, 11, None, 13, 14, 15]),
                      "x": pa.array([1.0, float("inf"), 2.0, 1e300, None, -1.0]),
                      "t": pa.array(["1", "2", "3", "4", "abc", None]),
                      "c": pa.array(["a", None, "b", "z", "a", "b"])})
    checked = check_rows(table, transform, "id", first_row=100)
    rejects = checked.rejects.to_pylist()
    assert [(r["id"], r["field"]) for r in rejects] == [(11, "x"), (None, "id"), (13, "x"), (14, "t")]
    reasons = [r["reason"] for r in rejects]
    assert reasons[0] == "expected a finite number or null, found Infinity"
    assert reasons[1] == "the row has no id (scoring.id_column is null)"
    assert "1e+300 is beyond what the model can take: x must lie between" in reasons[2]
    assert reasons[3] == "expected a number or null, found 'abc'"
    assert checked.ids.to_pylist() == [10, 15] and len(checked.frame) == 2
    ordinals = check_rows(table.drop(["id"]), transform, None, first_row=100)
    assert ordinals.rejects.column_names == ["row", "field", "reason"]
    assert ordinals.rejects["row"].to_pylist() == [101, 103, 104] and ordinals.ids.to_pylist() == [100, 102, 105]


@pytest.mark.parametrize("values", [pa.array([2007, 2008, None, 2009]), pa.array([2007.0, 2008.0, None, 2009.5])],
                         ids=["int", "float"])
@pytest.mark.parametrize("vocabulary", [("2007", "2009.5"), ("2007.0", "2008")], ids=["int-form", "float-form"])
def test_numbers_in_a_categorical_column_take_the_slot_the_server_gives_them(values: pa.Array,
                                                                              vocabulary: tuple) -> None:
    transform = FeatureTransform("regression", "y", "standard", 10, (), (CategoricalColumn("year", vocabulary),), None)
    checked = check_rows(pa.table({"year": values}), transform, None, first_row=0)
    served = RecordTransform(transform)(records_from_frame(pa.table({"year": values}).to_pandas()))
    assert np.array_equal(transform.transform(checked.frame), served)


@pytest.mark.parametrize("column", [pa.array(["a", "z", None, "b"]), pa.array(["a", "z", None, "b"], pa.large_string()),
                                    pa.array(["a", "z", None, "b"]).dictionary_encode(),
                                    pa.array([True, False, None, True])], ids=["string", "large", "dictionary", "bool"])
@pytest.mark.parametrize("rejected", [False, True], ids=["all-accepted", "one-rejected"])
def test_accepted_rows_transform_as_the_same_rows_read_by_pandas(column: pa.Array, rejected: bool) -> None:
    transform = FeatureTransform("regression", "y", "standard", 10, (NumericColumn("x", 0.0, 0.0, 1.0),),
                                 (CategoricalColumn("c", ("a", "b", "True")),), None)
    table = pa.table({"x": [1.0, float("inf") if rejected else 2.0, 3.0, 4.0], "c": column})
    checked = check_rows(table, transform, None, first_row=0)
    kept = [0, 2, 3] if rejected else [0, 1, 2, 3]
    assert checked.ids.to_pylist() == kept and checked.rejects.num_rows == 4 - len(kept)
    expected = transform.transform(table.take(kept).to_pandas())
    assert np.array_equal(transform.transform(checked.frame), expected)


@pytest.fixture(scope="module")
def bundle(bundle_factory) -> Path:  # noqa: F811
    return bundle_factory(seed=0)


def _model(bundle: Path) -> ScoringModel:
    return ScoringModel(version="7", bundle=str(bundle))


def test_a_committed_run_has_predictions_rejects_and_a_manifest_of_every_file(tmp_path: Path, bundle: Path) -> None:
    path = _input(tmp_path, **{"bill_length_mm@4": "n/a", "flipper_length_mm@2500": float("inf")})
    store, config = LocalArtifactStore(tmp_path / "store"), _config(path)
    result = steps.run_score(SPEC, config, store, "run 1", model=_model(bundle))
    assert (result.rows, result.scored, result.rejected, result.partitions, result.version) == (3000, 2998, 2, 3, "7")
    # The input is staged in row groups of the partition size: a partition decodes its own rows only.
    staged = pq.ParquetFile(store.path(f"{work_key(SPEC.name, 'run 1')}/input") / "snapshot.parquet").metadata
    assert [staged.row_group(i).num_rows for i in range(staged.num_row_groups)] == [1000, 1000, 1000]
    out = store.path(output_key(config, "run 1"))
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["model"]["version"] == "7" and manifest["model"]["bundle"] == str(bundle)
    assert manifest["input"]["rows"] == 3000 and manifest["input"]["description"] == str(path)
    assert manifest["input"]["snapshot_sha256"] and manifest["input"]["source_kind"] == "file"
    assert [(p["start"], p["stop"], p["rejected"]) for p in manifest["partitions"]] == [
        (0, 1000, 1), (1000, 2000, 0), (2000, 3000, 1)]
    assert set(manifest["files"]) == {"predictions/part-00000.parquet", "predictions/part-00001.parquet",
                                      "predictions/part-00002.parquet", "rejects.parquet"}
    for name, digest in manifest["files"].items():
        assert file_sha256(out / name) == digest, name
    predictions = pd.concat(pd.read_parquet(out / p["file"]) for p in manifest["partitions"])
    assert list(predictions.columns) == ["row", "label", "probability_Adelie", "probability_Chinstrap",
                                         "probability_Gentoo", "model_version"]
    assert predictions["row"].tolist() == [i for i in range(3000) if i not in (4, 2500)]
    assert set(predictions["model_version"].astype(str)) == {"7"}
    rejects = pd.read_parquet(out / "rejects.parquet")
    assert rejects.to_dict("records") == [
        {"row": 4, "field": "bill_length_mm", "reason": "expected a number or null, found 'n/a'"},
        {"row": 2500, "field": "flipper_length_mm", "reason": "expected a finite number or null, found Infinity"}]
    # The same rows through the bundle's record path (the model server's) give the same answers.
    raw = pd.read_parquet(path).drop(index=[4, 2500]).head(50).astype({"bill_length_mm": float})
    loaded = load_bundle(bundle)
    served = loaded.format_predictions(loaded.predict_records(records_from_frame(raw)))
    assert predictions["label"].astype(str).head(50).tolist() == [s["label"] for s in served]
    assert np.allclose(predictions["probability_Gentoo"].head(50), [s["probabilities"]["Gentoo"] for s in served],
                       atol=1e-6)


def test_a_run_with_a_failed_partition_commits_nothing_and_leaves_earlier_output(tmp_path: Path,
                                                                                 bundle: Path) -> None:
    path = _input(tmp_path)
    store, config = LocalArtifactStore(tmp_path / "store"), _config(path)
    good = steps.run_score(SPEC, config, store, "good", model=_model(bundle), validate_input=False)
    steps.prepare(config, store, "broken", _model(bundle))
    parts = steps.partition(config, store, "broken")
    for part in parts[:2]:  # the third partition's task failed
        steps.score(config, store, "broken", part)
    with pytest.raises(ScoringError, match=r"partitions \[2\] of 3 have no scored output"):
        steps.commit(config, store, "broken")
    assert not store.exists(output_key(config, "broken"))
    assert store.children(config.output) == ["good"]
    assert json.loads((store.path(output_key(config, "good")) / MANIFEST_FILE).read_text())["scored"] == good.scored


def test_too_many_rejects_commit_nothing(tmp_path: Path, bundle: Path) -> None:
    path = _input(tmp_path, **{f"bill_length_mm@{i}": "x" for i in range(0, 3000, 20)})  # 5 % rejected
    store, config = LocalArtifactStore(tmp_path / "store"), _config(path, max_rejected_share=0.01)
    with pytest.raises(ScoringError, match=r"150 of 3000 rows \(5.0%\) were rejected, more than "
                                           r"scoring.max_rejected_share \(0.01\)"):
        steps.run_score(SPEC, config, store, "r", model=_model(bundle), validate_input=False)
    assert store.children(config.output) == []


def test_an_input_that_does_not_match_the_signature_is_refused_before_any_output(tmp_path: Path,
                                                                                 bundle: Path) -> None:
    df = raw_table(100, seed=1).drop(columns=[TARGET, "bill_depth_mm"])
    df["island"] = pd.Timestamp("2026-01-01")
    df.to_parquet(tmp_path / "batch.parquet", index=False)
    store, config = LocalArtifactStore(tmp_path / "store"), _config(tmp_path / "batch.parquet")
    with pytest.raises(ScoringError) as caught:
        steps.run_score(SPEC, config, store, "r", model=_model(bundle))
    message = str(caught.value)
    assert "column 'bill_depth_mm' is missing" in message
    assert "column 'island' is timestamp[us], the model takes text, a number or a boolean" in message
    assert "rename or cast them" in message
    assert store.children(config.output) == [] and store.children(f"{SPEC.name}/_scoring/r") == []


def test_a_missing_input_is_refused_naming_the_param(tmp_path: Path, bundle: Path) -> None:
    store, config = LocalArtifactStore(tmp_path / "store"), _config(tmp_path / "nothing.parquet")
    with pytest.raises(ScoringError, match=r"Param 'input' \(.*nothing.parquet\)"):
        steps.run_score(SPEC, config, store, "r", model=_model(bundle))
    assert store.children(config.output) == []


def test_an_input_that_fails_the_suite_is_refused_with_the_report_published(tmp_path: Path, bundle: Path) -> None:
    from kiln.tasks.steps.validate import DataValidationError

    path = _input(tmp_path, n=200)
    df = pd.read_parquet(path)
    df["island"] = "Atlantis"  # the spec's declared expectation: island in {Biscoe, Dream, Torgersen}
    df.to_parquet(path, index=False)
    store, config = LocalArtifactStore(tmp_path / "store"), _config(path)
    with pytest.raises(DataValidationError, match="expect_column_values_to_be_in_set column 'island'"):
        steps.run_score(SPEC, config, store, "r", model=_model(bundle))
    assert store.children(config.output) == []
    report = store.path(f"{SPEC.name}/_scoring/r/validate") / "validation.json"
    assert json.loads(report.read_text())["success"] is False
