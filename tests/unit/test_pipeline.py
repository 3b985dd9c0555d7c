"""Pipeline wiring: run-keyed outputs, an immutable snapshot per run, failures that publish nothing downstream."""

from __future__ import annotations

import stat
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kiln.tasks.pipeline.context import make_context
from kiln.tasks.spec import SpecError
from kiln.tasks.steps.clean import clean
from kiln.tasks.steps.ingest import ingest
from kiln.tasks.steps.validate import validate
from kiln.tasks.storage.artifacts import LocalArtifactStore


def _spec(tmp_path: Path, rows: int = 40) -> Path:
    df = pd.DataFrame({"x": range(rows), "c": ["a", "b"] * (rows // 2), "y": ["p", "q"] * (rows // 2)})
    df.to_csv(tmp_path / "data.csv", index=False)
    spec = {"name": "tiny", "source": {"uri": "data.csv"}, "target": "y", "task": "classification"}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "tiny.yaml"


def test_snapshot_is_taken_once_per_run(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    ctx = make_context(_spec(tmp_path), "manual__1", store=store)
    first = ingest(ctx)
    snapshot = store.path(ctx.key("ingest")) / "snapshot.parquet"
    assert not snapshot.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)

    pd.DataFrame({"x": [1], "c": ["a"], "y": ["p"]}).to_csv(tmp_path / "data.csv", index=False)  # source changes
    again = ingest(ctx)  # a retry of the same run
    assert again == first and again.rows == 40
    other_run = ingest(make_context(tmp_path / "tiny.yaml", "manual__2", store=store))
    assert other_run.rows == 1 and other_run.sha256 != first.sha256


def test_step_results_point_at_published_folders(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    ctx = make_context(_spec(tmp_path), "manual__1", store=store)
    ingest(ctx)
    validated = validate(ctx)
    assert validated.report_file == str(store.path(ctx.key("validate")) / "validation.json")
    cleaned = clean(ctx)
    assert Path(cleaned.report_file).is_file()


def test_failed_step_publishes_nothing(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    ctx = make_context(_spec(tmp_path), "manual__1", store=store)
    with pytest.raises(FileNotFoundError, match="no artifact published"):
        clean(ctx)  # ingest never ran: nothing is read implicitly from elsewhere
    assert not store.exists(ctx.key("clean"))


def test_bad_params_are_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="training.epochs"):
        make_context(_spec(tmp_path), "r", {"epochs": 0}, store=LocalArtifactStore(tmp_path))
