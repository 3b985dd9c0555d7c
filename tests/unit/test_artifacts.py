"""The artifact store publishes a step's output all at once or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.tasks.storage.artifacts import (
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


def test_store_for_root_picks_the_store_by_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.tasks.storage.artifacts import LocalArtifactStore, store_for_root
    from kiln.tasks.storage.s3 import S3ArtifactStore

    assert isinstance(store_for_root(str(tmp_path)), LocalArtifactStore)
    monkeypatch.setenv("KILN_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    store = store_for_root("s3://my-bucket/some/prefix/")
    assert isinstance(store, S3ArtifactStore)
    assert (store.bucket, store.prefix, store.endpoint) == ("my-bucket", "some/prefix", "http://127.0.0.1:9")
    assert store.uri("p/r/ingest") == "s3://my-bucket/some/prefix/p/r/ingest"
    assert store.scratch("p/r/checkpoints").is_dir()
    with pytest.raises(ValueError, match="KILN_ARTIFACT_ROOT='gs://b/p' is not supported"):
        store_for_root("gs://b/p")
    with pytest.raises(ValueError, match="names no bucket"):
        store_for_root("s3:///prefix")


def test_settings_keep_an_s3_root_as_a_uri(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from kiln.tasks.settings import get_settings

    monkeypatch.setenv("KILN_ARTIFACT_ROOT", "s3://bucket/kiln")
    assert get_settings().artifact_root == "s3://bucket/kiln"
    monkeypatch.setenv("KILN_ARTIFACT_ROOT", str(tmp_path / "a" / ".." / "b"))
    assert get_settings().artifact_root == tmp_path / "b"


@pytest.mark.parametrize("key", ["", "/", "a/../b", "./a", "a/.v/b"],
                         ids=["empty", "slash", "dotdot", "dot", "versions"])
def test_key_parts_refuses_reserved_names(key: str) -> None:
    from kiln.tasks.storage.artifacts import key_parts

    with pytest.raises(ValueError, match="invalid artifact key"):
        key_parts(key)
    assert key_parts("/a//b/") == ["a", "b"]


def test_a_key_left_missing_by_a_killed_two_rename_publish_is_restored(tmp_path: Path) -> None:
    """What kiln before issue 20 left on a kill between its renames: no key, the contents under ``.old-``."""
    store = LocalArtifactStore(tmp_path)
    with store.writer("p/r/clean") as out:
        (out / "v.txt").write_text("good")
    (tmp_path / "p" / "r" / "clean").rename(tmp_path / "p" / "r" / ".old-clean-1234abcd")
    assert store.exists("p/r/clean")
    assert (store.path("p/r/clean") / "v.txt").read_text() == "good"


def test_the_sweep_touches_only_the_leftovers_of_its_own_key(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    run = tmp_path / "p" / "r"
    others = [".tmp-train-x-1234abcd", ".old-train-x-1234abcd", ".tmp-trains-1234abcd", "train-1234abcd"]
    for name in [*others, ".tmp-train-1234abcd", ".old-train-99999999"]:
        (run / name).mkdir(parents=True)
        (run / name / "f").write_text(name)
    with store.writer("p/r/train") as out:
        (out / "v.txt").write_text("new")
    assert sorted(p.name for p in run.iterdir()) == sorted([*others, ".lock-train", "train"])
    assert (store.path("p/r/train") / "v.txt").read_text() == "new"


def test_atomic_write_removes_dead_writers_temp_files_and_keeps_live_ones(tmp_path: Path) -> None:
    import fcntl
    import os

    dead, live = tmp_path / ".x.json.tmp-1234abcd", tmp_path / ".x.json.tmp-0123456789abcdef"
    other = tmp_path / ".y.json.tmp-1234abcd"
    for path in (dead, live, other):
        path.write_bytes(b"partial")
    fd = os.open(live, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a writer still writing it
        write_json(tmp_path / "x.json", {"a": 1})
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "x.json"])
    finally:
        os.close(fd)
    atomic_write_bytes(tmp_path / "x.json", b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, "x.json"])
    assert read_json(tmp_path / "x.json") == {}


def test_children_are_the_names_under_a_key_without_writers_folders(tmp_path):
    store = LocalArtifactStore(tmp_path / "store")
    for key in ("p/_capture/version=1/a", "p/_capture/version=1/b", "p/_capture/version=2/c"):
        with store.writer(key) as out:
            (out / "f").write_text("x")
    (tmp_path / "store" / "p" / "_capture" / "version=1" / ".tmp-killed-writer").mkdir()
    assert store.children("p/_capture") == ["version=1", "version=2"]
    assert store.children("p/_capture/version=1") == ["a", "b"]
    assert store.children("p/nothing") == []
