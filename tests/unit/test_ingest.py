"""Unit tests for the ``ingest`` step: sources, formats, sampling, the manifest, and every refusal."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from pathlib import Path

import pandas as pd
import pytest

from kiln.tasks.pipeline.keys import SNAPSHOT_FILE
from kiln.tasks.pipeline.keys import SNAPSHOT_MANIFEST_FILE as MANIFEST_FILE
from kiln.tasks.spec import SourceSpec, load_spec
from kiln.tasks.steps.ingest import IngestConfig, IngestError, run_ingest

REPO = Path(__file__).resolve().parents[2]
CSV = "a,b,label\n1,2.5,x\n3,4.5,y\n5,,x\n7,8.5,z\n"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ingest(tmp_path: Path, uri: str, sample_fraction: float = 1.0, seed: int = 42, out: str = "out", **source):
    out_dir = tmp_path / out
    out_dir.mkdir()
    config = IngestConfig(SourceSpec(uri=uri, **source), sample_fraction, seed, data_roots=(tmp_path,))
    return run_ingest(config, out_dir), out_dir


def test_csv_snapshot_and_manifest(tmp_path):
    src = tmp_path / "data.csv"
    src.write_text(CSV)
    result, out = ingest(tmp_path, str(src))

    snap = pd.read_parquet(out / SNAPSHOT_FILE)
    assert snap.shape == (4, 3)
    assert snap["b"].isna().sum() == 1
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["rows"] == result.rows == 4
    assert list(manifest["columns"]) == ["a", "b", "label"]  # column order kept
    assert manifest["columns"]["a"] == "int64" and manifest["columns"]["b"] == "float64"
    assert manifest["sha256"] == result.sha256 == sha256(out / SNAPSHOT_FILE)
    assert manifest["source_sha256"] == result.source_sha256 == sha256(src)
    assert manifest["source_uri"] == str(src)
    assert {"sample_fraction", "seed", "created_at"} <= set(manifest)
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()


@pytest.mark.parametrize("form", ["file_uri", "gzip", "parquet", "parquet_declared"],
                         ids=["file-uri", "csv-gz", "parquet-by-extension", "parquet-declared-format"])
def test_source_forms(tmp_path, form):
    df = pd.read_csv(io.StringIO(CSV))
    source: dict = {}
    if form == "file_uri":
        (tmp_path / "d.csv").write_text(CSV)
        uri = (tmp_path / "d.csv").as_uri()
    elif form == "gzip":
        (tmp_path / "d.csv.gz").write_bytes(gzip.compress(CSV.encode()))
        uri = str(tmp_path / "d.csv.gz")
    elif form == "parquet":
        df.to_parquet(tmp_path / "d.parquet")
        uri = str(tmp_path / "d.parquet")
    else:
        df.to_parquet(tmp_path / "d.bin")
        uri, source = str(tmp_path / "d.bin"), {"format": "parquet"}
    result, out = ingest(tmp_path, uri, **source)
    assert result.rows == 4
    pd.testing.assert_frame_equal(pd.read_parquet(out / SNAPSHOT_FILE), df)


@pytest.mark.parametrize(("column_names", "expected"), [
    (None, ["col_0", "col_1", "col_2"]),
    (["p", "q", "r"], ["p", "q", "r"]),
], ids=["generated-names", "given-names"])
def test_headerless_csv(tmp_path, column_names, expected):
    (tmp_path / "d.csv").write_text("1,2,3\n4,5,6\n")
    result, out = ingest(tmp_path, str(tmp_path / "d.csv"), header=False, column_names=column_names)
    assert list(result.columns) == expected
    assert pd.read_parquet(out / SNAPSHOT_FILE).iloc[1].tolist() == [4, 5, 6]


def test_sampling_is_seeded_and_keeps_source_order(tmp_path):
    (tmp_path / "d.csv").write_text("i\n" + "\n".join(str(i) for i in range(100)) + "\n")
    first, out1 = ingest(tmp_path, str(tmp_path / "d.csv"), 0.3, seed=7, out="o1")
    second, out2 = ingest(tmp_path, str(tmp_path / "d.csv"), 0.3, seed=7, out="o2")
    other, out3 = ingest(tmp_path, str(tmp_path / "d.csv"), 0.3, seed=8, out="o3")
    values = pd.read_parquet(out1 / SNAPSHOT_FILE)["i"].tolist()
    assert first.rows == 30
    assert values == sorted(values)
    assert first.sha256 == second.sha256
    assert values != pd.read_parquet(out3 / SNAPSHOT_FILE)["i"].tolist()
    assert json.loads((out1 / MANIFEST_FILE).read_text())["sample_fraction"] == 0.3


def write(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


@pytest.mark.parametrize(("make_uri", "source", "fraction", "needles"), [
    (lambda t: str(t / "nope.csv"), {}, 1.0, ["nope.csv", "does not exist", "source.uri should point to"]),
    (lambda t: "pkg://no_such_pkg_kiln/data.csv", {}, 1.0, ["no installed Python package 'no_such_pkg_kiln'"]),
    (lambda t: "pkg://palmerpenguins/data/penguin.csv", {}, 1.0, ["has no resource", "did you mean 'penguins.csv'"]),
    (lambda t: "pkg://palmerpenguins", {}, 1.0, ["pkg://<package>/<resource path>"]),
    (lambda t: "ftp://host/key.csv", {}, 1.0, ["unsupported scheme 'ftp'"]),
    (lambda t: write(t, "d.parquet", CSV), {}, 1.0, ["cannot read source", "as parquet", "source.format"]),
    (lambda t: write(t, "d.csv", b""), {}, 1.0, ["is empty"]),
    (lambda t: write(t, "d.csv", "a,b\n"), {}, 1.0, ["no data rows"]),
    (lambda t: write(t, "d.csv", "a,b,a\n1,2,3\n"), {}, 1.0, ["duplicate column names", "a"]),
    (lambda t: write(t, "d.csv", "1,2\n"), {"header": False, "column_names": ["x", "x"]}, 1.0,
     ["duplicate column names in source.column_names: x"]),
    (lambda t: write(t, "d.csv", "1,2,3\n"), {"header": False, "column_names": ["x", "y"]}, 1.0,
     ["column_names has 2 names", "3 columns"]),
    (lambda t: write(t, "d.csv", "a\n1\n"), {"column_names": ["x"]}, 1.0, ["header: false"]),
    (lambda t: write(t, "d.csv", "a\n1\n"), {}, 0.01, ["leaves 0 rows", "sample_fraction"]),
    (lambda t: write(t, "d.csv", b"\xff\xfe\x00bad\x00\n\xff"), {}, 1.0, ["cannot read source", "as csv"]),
], ids=["missing-file", "unknown-package", "missing-package-resource", "pkg-without-resource",
        "unsupported-scheme", "parquet-declared-but-csv", "empty-file", "header-only", "duplicate-header",
        "duplicate-column-names", "wrong-column-names-length", "column-names-with-header", "sample-leaves-nothing",
        "not-text"])
def test_bad_sources_raise_clear_errors_and_write_nothing(tmp_path, make_uri, source, fraction, needles):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(IngestError) as exc:
        run_ingest(IngestConfig(SourceSpec(uri=make_uri(tmp_path), **source), fraction, data_roots=(tmp_path,)), out)
    for needle in needles:
        assert needle in str(exc.value)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.1], ids=["zero", "above-one", "negative"])
def test_config_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="sample_fraction"):
        IngestConfig(SourceSpec(uri="/x.csv"), fraction)


def test_penguins_spec_from_package(tmp_path):
    spec = load_spec(REPO / "dags/pipelines/penguins_species.yaml")
    out = tmp_path / "out"
    out.mkdir()
    result = run_ingest(IngestConfig(spec.source, spec.sample_fraction, spec.training.seed), out)
    assert result.rows == 344
    assert result.source_uri == "pkg://palmerpenguins/data/penguins.csv"
    assert set(result.columns) == {"species", "island", "bill_length_mm", "bill_depth_mm", "flipper_length_mm",
                                   "body_mass_g", "sex", "year"}
