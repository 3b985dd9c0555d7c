"""The artifact store publishes a step's output all at once or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.artifacts import (
    ArtifactNotFoundError,
    LocalArtifactStore,
    atomic_write_bytes,
    read_json,
    run_key,
    write_json,
)


def test_publish_on_success(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    with store.writer("p/r/ingest") as out:
        (out / "a.txt").write_text("1")
        assert not store.exists("p/r/ingest")  # invisible until the step finishes
    assert (store.path("p/r/ingest") / "a.txt").read_text() == "1"


def test_failed_step_leaves_previous_output_untouched(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    with store.writer("p/r/clean") as out:
        (out / "v.txt").write_text("good")
    with pytest.raises(RuntimeError), store.writer("p/r/clean") as out:
        (out / "v.txt").write_text("half")
        raise RuntimeError("step failed")
    assert (store.path("p/r/clean") / "v.txt").read_text() == "good"
    assert [p.name for p in (tmp_path / "p" / "r").iterdir()] == ["clean"]  # no temp folders left


def test_republish_replaces(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    for value in ("one", "two"):
        with store.writer("k") as out:
            (out / "v.txt").write_text(value)
    assert (store.path("k") / "v.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]


def test_missing_key_and_bad_keys(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    with pytest.raises(ArtifactNotFoundError, match="no artifact published"):
        store.path("p/r/train")
    for bad in ("", "../x", "a/./b"):
        with pytest.raises(ValueError, match="invalid artifact key"):
            store.path(bad)


def test_run_key_is_path_safe() -> None:
    assert run_key("penguins", "manual__2026-11-22T19:10:32.624900+00:00") == \
        "penguins/manual__2026-11-22T19_10_32.624900_00_00"
    assert run_key("p", "../..") == "p/run"


def test_atomic_write(tmp_path: Path) -> None:
    target = write_json(tmp_path / "d" / "x.json", {"a": 1})
    assert read_json(target) == {"a": 1}
    atomic_write_bytes(target, b"{}")
    assert read_json(target) == {}
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]
