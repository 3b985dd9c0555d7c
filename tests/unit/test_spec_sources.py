"""Hostile ``source.uri`` values are refused at spec load (naming the field) and again at ingest (defence in
depth): file sources stay inside the data roots after normalisation and symlinks, and ``pkg://`` reads an
installed package's files without importing anything."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from kiln.tasks.spec import SourceSpec, SpecError, load_spec
from kiln.tasks.steps.ingest import IngestConfig, IngestError, run_ingest

CSV = "a,y\n1,p\n2,q\n"


def _spec(folder: Path, uri: str, name: str = "p") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "source": {"uri": uri}, "target": "y", "task": "classification"}))
    return path


@pytest.fixture
def pipelines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KILN_DATA_ROOTS", raising=False)
    return tmp_path / "deep" / "pipelines"


def _hostile(pipelines: Path) -> dict[str, str]:
    outside = pipelines.parent / "secret.csv"
    outside.parent.mkdir(parents=True, exist_ok=True)
    outside.write_text(CSV)
    (pipelines).mkdir(parents=True, exist_ok=True)
    (pipelines / "link.csv").symlink_to(outside)
    return {
        "file-uri-etc-passwd": "file:///etc/passwd",
        "absolute-etc-passwd": "/etc/passwd",
        "relative-dotdot": "../../etc/hostname",
        "dotdot-inside-path": f"{pipelines}/../secret.csv",
        "symlink-out-of-root": "link.csv",
        "pkg-dotdot": "pkg://palmerpenguins/../../../../etc/passwd",
        "pkg-dot-segment": "pkg://palmerpenguins/./data/penguins.csv",
        "pkg-absolute-resource": "pkg://palmerpenguins//etc/passwd",
        "pkg-dotted-package": "pkg://palmerpenguins.data/penguins.csv",
    }


HOSTILE_AT_LOAD = ["file-uri-etc-passwd", "absolute-etc-passwd", "relative-dotdot", "dotdot-inside-path",
                   "symlink-out-of-root", "pkg-dotdot", "pkg-dot-segment", "pkg-absolute-resource",
                   "pkg-dotted-package"]


@pytest.mark.parametrize("case", HOSTILE_AT_LOAD)
def test_hostile_source_refused_at_load_naming_the_field_and_fix(pipelines: Path, case: str) -> None:
    uri = _hostile(pipelines)[case]
    with pytest.raises(SpecError) as info:
        load_spec(_spec(pipelines, uri))
    message = str(info.value)
    assert "field 'source.uri'" in message
    if not uri.startswith("pkg://"):
        assert "outside the data roots" in message and "KILN_DATA_ROOTS" in message
        assert str(pipelines) in message  # the roots are listed
    else:
        assert "pkg://<package>/<resource path>" in message


def test_sources_inside_the_roots_load(pipelines: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (pipelines / "data").mkdir(parents=True)
    (pipelines / "data" / "x.csv").write_text(CSV)
    assert load_spec(_spec(pipelines, "data/x.csv")).source.uri == str(pipelines / "data" / "x.csv")
    kiln_data = tmp_path / "home" / "data"  # kiln's data folder: $KILN_HOME/data
    kiln_data.mkdir(parents=True)
    assert load_spec(_spec(pipelines, (kiln_data / "y.csv").as_uri())).name == "p"
    assert load_spec(_spec(pipelines, "pkg://palmerpenguins/data/penguins.csv")).name == "p"
    extra = tmp_path / "lake"
    with pytest.raises(SpecError, match="outside the data roots"):
        load_spec(_spec(pipelines, str(extra / "z.csv")))
    monkeypatch.setenv("KILN_DATA_ROOTS", f"{tmp_path / 'elsewhere'}:{extra}")  # the setting adds roots
    assert load_spec(_spec(pipelines, str(extra / "z.csv"))).source.uri == str(extra / "z.csv")


def _ingest(tmp_path: Path, uri: str, roots: tuple[Path, ...]) -> None:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    run_ingest(IngestConfig(SourceSpec(uri=uri), data_roots=roots), out)


@pytest.mark.parametrize("case", ["file-uri-etc-passwd", "absolute-etc-passwd", "dotdot-inside-path",
                                  "symlink-out-of-root", "pkg-dotdot", "pkg-dot-segment", "pkg-dotted-package"])
def test_hostile_source_refused_at_ingest(pipelines: Path, tmp_path: Path, case: str) -> None:
    """A spec validated elsewhere (or an older one) still cannot make ingest read outside the roots."""
    uri = _hostile(pipelines)[case]
    if case == "symlink-out-of-root":
        uri = str(pipelines / uri)
    with pytest.raises(IngestError, match="source.uri") as info:
        _ingest(tmp_path, uri, (pipelines,))
    assert not list((tmp_path / "out").iterdir())
    assert "KILN_DATA_ROOTS" in str(info.value) or "pkg://<package>/<resource path>" in str(info.value)


def test_pkg_source_never_imports_a_module(tmp_path: Path) -> None:
    """``pkg://this/x`` used to import (run) the module ``this``; only installed packages' files are read."""
    assert "this" not in sys.modules
    with pytest.raises(IngestError) as info:
        _ingest(tmp_path, "pkg://this/x.csv", ())
    assert "this" not in sys.modules
    assert "installed" in str(info.value) and "source.uri" in str(info.value)
    with pytest.raises(IngestError, match="not a package"):
        _ingest(tmp_path, "pkg://typing_extensions/x.csv", ())  # a single-module distribution has no data


def test_pkg_source_reads_package_data(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = run_ingest(IngestConfig(SourceSpec(uri="pkg://sklearn/datasets/data/digits.csv.gz", header=False),
                                     data_roots=()), out)
    assert result.rows == 1797


def test_files_inside_the_roots_are_read(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text(CSV)
    out = tmp_path / "out"
    out.mkdir()
    assert run_ingest(IngestConfig(SourceSpec(uri=(tmp_path / "d.csv").as_uri()), data_roots=(tmp_path,)),
                      out).rows == 2


def _source_spec(folder: Path, source: dict, **top: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "source": source, "target": "y", "task": "classification", **top}))
    return path


@pytest.mark.parametrize(("source", "top", "needles"), [
    ({"uri": "s3://Bad_Bucket/x.csv"}, {}, ["source.uri", "is not an S3 bucket name"]),
    ({"uri": "s3://bucket/a/../b.csv"}, {}, ["source.uri", "'.' and '..' are not allowed"]),
    ({"uri": "d.csv", "sql": {"conn_id": "db", "query": "SELECT 1"}}, {}, ["exactly one of source.uri"]),
    ({"sql": {"conn_id": "db", "query": "SELECT 1"}, "incremental": "append"}, {}, ["data_interval_start"]),
    ({"sql": {"conn_id": "db", "query": "SELECT 1"}, "watch": {}}, {}, ["source.sql.watermark_column"]),
    ({"uri": "pkg://palmerpenguins/data/penguins.csv", "incremental": "append"}, {}, ["never changes"]),
    ({"uri": "s3://bucket/in/"}, {"asset": "s3://bucket/other/"}, ["make source.uri that URI"]),
], ids=["bad-bucket", "dotdot-key", "uri-and-sql", "sql-incremental", "sql-watch-without-watermark",
        "pkg-incremental", "asset-not-the-source"])
def test_source_kinds_refused_at_load(pipelines: Path, source: dict, top: dict, needles: list[str]) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(_source_spec(pipelines, source, **top))
    for needle in needles:
        assert needle in str(info.value)


def test_source_kinds_load(pipelines: Path) -> None:
    s3 = load_spec(_source_spec(pipelines, {"uri": "s3://landing/in/", "incremental": "new_only",
                                            "watch": {"interval_s": 30}}))
    assert s3.source.kind == "s3" and s3.source.uri == "s3://landing/in/"
    sql = load_spec(_source_spec(pipelines, {"sql": {"conn_id": "wh", "query": "SELECT * FROM t"}}))
    assert sql.source.kind == "sql" and sql.source.asset_uri("p") == "sql://wh/p"
