"""CheckpointMirror against a real local store told that its scratch folders are not durable (as on S3); the S3
store itself is exercised in tests/integration/test_s3_checkpoints.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from kiln.tasks.storage.artifacts import LocalArtifactStore
from kiln.tasks.training.checkpoint_sync import CheckpointMirror
from kiln.tasks.training.checkpoints import list_checkpoints

KEY = "demo/run/checkpoints"


class NonDurableStore(LocalArtifactStore):
    durable_scratch = False


def write_epoch(folder: Path, epoch: int, keep: int = 2) -> None:
    """What ``kiln.tasks.training.checkpoints.save_checkpoint`` does to the folder, without torch: one file, older
    ones gone."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"epoch_{epoch:04d}.pt").write_bytes(f"weights after epoch {epoch}".encode())
    for old, path in list_checkpoints(folder):
        if old <= epoch - keep:
            path.unlink()


def published(store: LocalArtifactStore) -> list[str]:
    return sorted(p.name for p in store.path(KEY).iterdir())


def test_the_newest_checkpoint_is_published_and_comes_back_on_a_clean_machine(tmp_path):
    store = NonDurableStore(tmp_path / "store")
    first = tmp_path / "machine-a"
    with CheckpointMirror(store, KEY, first, interval_s=0.05) as mirror:
        for epoch in (1, 2, 3):
            write_epoch(first, epoch)
        deadline = time.monotonic() + 10
        while mirror.published_epoch != 3:
            assert time.monotonic() < deadline, "the background publisher never published epoch 3"
            time.sleep(0.02)
    assert published(store) == ["epoch_0003.pt"]

    second = tmp_path / "machine-b"
    with CheckpointMirror(store, KEY, second) as mirror:
        assert [e for e, _ in list_checkpoints(second)] == [3]
        assert (second / "epoch_0003.pt").read_bytes() == b"weights after epoch 3"
        write_epoch(second, 4)
    assert published(store) == ["epoch_0004.pt"], "the exit must publish the last checkpoint"


def test_restore_keeps_newer_local_checkpoints(tmp_path):
    store = NonDurableStore(tmp_path / "store")
    with CheckpointMirror(store, KEY, tmp_path / "a"):
        write_epoch(tmp_path / "a", 2)
    local = tmp_path / "b"
    write_epoch(local, 5)
    assert CheckpointMirror(store, KEY, local).restore() is None
    assert [e for e, _ in list_checkpoints(local)] == [5]


def test_a_failed_job_still_publishes_its_last_checkpoint(tmp_path):
    store = NonDurableStore(tmp_path / "store")
    with pytest.raises(RuntimeError, match="rank died"), CheckpointMirror(store, KEY, tmp_path / "a", interval_s=60):
        write_epoch(tmp_path / "a", 1)
        raise RuntimeError("rank died")
    assert published(store) == ["epoch_0001.pt"]


def test_a_checkpoint_deleted_while_it_is_published_is_skipped_for_the_newer_one(tmp_path, monkeypatch):
    store = NonDurableStore(tmp_path / "store")
    local = tmp_path / "a"
    write_epoch(local, 1)
    mirror = CheckpointMirror(store, KEY, local)
    real_writer = store.writer
    raced = threading.Event()

    def writer_that_races(key):
        if not raced.is_set():  # the trainer writes epoch 3 and deletes epoch 1 before the link is made
            raced.set()
            write_epoch(local, 2)
            write_epoch(local, 3)
        return real_writer(key)

    monkeypatch.setattr(store, "writer", writer_that_races)
    assert mirror.publish_newest() == 3
    assert published(store) == ["epoch_0003.pt"]


def test_a_durable_store_is_left_alone(tmp_path):
    store = LocalArtifactStore(tmp_path / "store")
    scratch = store.scratch(KEY)
    with CheckpointMirror(store, KEY, scratch) as mirror:
        write_epoch(scratch, 1)
    assert not mirror.active and mirror.published_epoch is None
    assert [e for e, _ in list_checkpoints(scratch)] == [1]
