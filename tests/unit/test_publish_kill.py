"""A local publish killed with SIGKILL at any point leaves its key readable (old or new contents, never missing),
and the next write of the key removes what the killed writer left; concurrent writers never mix their outputs.

Each writer is a real child process. It stops itself with SIGKILL at a named point of the publish through the test
seam ``kiln.tasks.storage.publish._test_hook``; ``_use_exchange = False`` makes it publish as on a filesystem that
refuses RENAME_EXCHANGE (two renames under the key lock).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiln.tasks.storage import publish
from kiln.tasks.storage.artifacts import ArtifactNotFoundError, LocalArtifactStore

KEY = "p/r/train"
FILES = 20

# argv: root key value point mode files [pause_dir]. At `point`, the writer SIGKILLs itself, or, with a pause_dir,
# writes pause_dir/reached and waits for pause_dir/go (a live writer caught mid-publish).
CHILD = r"""
import os, signal, sys, time
from pathlib import Path
from kiln.tasks.storage import publish
from kiln.tasks.storage.artifacts import LocalArtifactStore

root, key, value, point, mode, files, *pause = sys.argv[1:]
publish._use_exchange = mode == "exchange"

def hook(at, folder):
    if at != point:
        return
    if pause:
        (Path(pause[0]) / "reached").write_text(str(folder))
        while not (Path(pause[0]) / "go").exists():
            time.sleep(0.01)
        return
    if at == "cleanup":  # killed with the old contents half removed
        min(folder.iterdir()).unlink()
    os.kill(os.getpid(), signal.SIGKILL)

publish._test_hook = hook
with LocalArtifactStore(root).writer(key) as out:
    for i in range(int(files)):
        (out / f"f{i:03d}.txt").write_text(value)
"""


def _write(store: LocalArtifactStore, value: str, files: int = FILES) -> None:
    with store.writer(KEY) as out:
        for i in range(files):
            (out / f"f{i:03d}.txt").write_text(value)


def _contents(store: LocalArtifactStore) -> set[str]:
    """The values in the published files; one value and FILES files, or the test fails."""
    folder = store.path(KEY)
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"f{i:03d}.txt" for i in range(FILES)], f"{KEY} holds {names}"
    return {(folder / n).read_text() for n in names}


def _child(root: Path, value: str, point: str, mode: str, pause: Path | None = None) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-c", CHILD, str(root), KEY, value, point, mode, str(FILES)]
    return subprocess.Popen([*args, *([str(pause)] if pause else [])], stderr=subprocess.PIPE)


def _siblings(store: LocalArtifactStore) -> list[str]:
    """What is beside the key, less the two-rename publish's lock file (an empty file that stays by design)."""
    return sorted(p.name for p in (store.root / "p" / "r").iterdir() if p.name != ".lock-train")


@pytest.fixture(params=["exchange", "two-renames"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How this process (and the test's children) publish."""
    monkeypatch.setattr(publish, "_use_exchange", request.param == "exchange")
    return str(request.param)


# (mode, point, what the key holds after the kill)
KILL_POINTS = [
    ("exchange", "before_publish", "old"),
    ("exchange", "swapped", "new"),
    ("exchange", "cleanup", "new"),
    ("two-renames", "before_publish", "old"),
    ("two-renames", "moved_aside", "old"),  # between the two renames
    ("two-renames", "renamed", "new"),
    ("two-renames", "cleanup", "new"),
]


@pytest.mark.parametrize(("kind", "point", "expect"), KILL_POINTS, ids=[f"{m}-{p}" for m, p, _ in KILL_POINTS])
def test_kill_at_each_point_of_a_publish_leaves_the_key_readable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 kind: str, point: str, expect: str) -> None:
    monkeypatch.setattr(publish, "_use_exchange", kind == "exchange")
    store = LocalArtifactStore(tmp_path)
    _write(store, "old")
    child = _child(tmp_path, "new", point, kind)
    _, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, f"the writer was not killed at {point}: {err.decode()[-2000:]}"
    assert [n for n in _siblings(store) if n.startswith((".tmp-train-", ".old-train-"))]  # it left something

    assert store.exists(KEY)
    assert _contents(store) == {expect}

    _write(store, "next")  # the next writer of the key removes the killed one's leftovers
    assert _contents(store) == {"next"}
    assert _siblings(store) == ["train"]


def test_kill_before_the_first_publish_leaves_the_key_unpublished_and_the_next_write_cleans(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    child = _child(tmp_path, "new", "before_publish", "exchange")
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert not store.exists(KEY)
    with pytest.raises(ArtifactNotFoundError):
        store.path(KEY)
    assert [n for n in _siblings(store) if n.startswith(".tmp-train-")]  # the killed writer's folder
    _write(store, "next")
    assert _siblings(store) == ["train"]


def test_kill_between_the_renames_then_a_failing_writer_keeps_the_old_output(tmp_path: Path, mode: str) -> None:
    """The next writer restores (or keeps) the key before its step runs, so a step that then fails changes nothing."""
    store = LocalArtifactStore(tmp_path)
    _write(store, "old")
    point = "moved_aside" if mode == "two-renames" else "swapped"
    _child(tmp_path, "new", point, mode).communicate(timeout=60)
    with pytest.raises(RuntimeError), store.writer(KEY) as out:
        (out / "half").write_text("x")
        raise RuntimeError("step failed")
    assert _contents(store) == ({"old"} if mode == "two-renames" else {"new"})
    assert _siblings(store) == ["train"]


STEP = r"""
import sys, time
from kiln.tasks.storage.artifacts import LocalArtifactStore

root, key = sys.argv[1:]
with LocalArtifactStore(root).writer(key) as out:
    (out / "half.txt").write_text("half")
    print(out, flush=True)
    time.sleep(600)  # a long step, killed from outside
"""


def test_a_writer_killed_during_its_step_leaves_nothing_after_the_next_write(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    _write(store, "old")
    child = subprocess.Popen([sys.executable, "-c", STEP, str(tmp_path), KEY], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        folder = Path(child.stdout.readline().decode().strip())
    finally:
        child.kill()  # SIGKILL, as the OOM killer does
        child.wait(timeout=60)
    assert folder.is_dir() and _contents(store) == {"old"}
    _write(store, "next")
    assert not folder.exists()
    assert _siblings(store) == ["train"]


REPRODUCE = r"""
import os, signal, sys
from pathlib import Path
from kiln.tasks.storage import artifacts
try:  # without RENAME_EXCHANGE, as on NFS (kiln before the fix always published with two renames)
    from kiln.tasks.storage import publish
    publish._use_exchange = False
except ImportError:
    pass
root, key = sys.argv[1:]
final = Path(root).joinpath(*key.split("/"))
rename = os.rename
def rename_then_die(src, dst, *args, **kwargs):
    rename(src, dst, *args, **kwargs)
    if Path(src) == final:  # the published folder has just been moved aside
        os.kill(os.getpid(), signal.SIGKILL)
os.rename = rename_then_die
with artifacts.LocalArtifactStore(root).writer(key) as out:
    (out / "v.txt").write_text("new")
"""


def test_writer_killed_after_moving_the_published_folder_aside(tmp_path: Path) -> None:
    """The report of issue 20: a kill between the two renames left the key missing, its output under ``.old-``."""
    store = LocalArtifactStore(tmp_path)
    with store.writer(KEY) as out:
        (out / "v.txt").write_text("old")
    child = subprocess.run([sys.executable, "-c", REPRODUCE, str(tmp_path), KEY], timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert store.exists(KEY)
    assert (store.path(KEY) / "v.txt").read_text() == "old"


def test_a_live_writers_folder_is_never_swept(tmp_path: Path, mode: str) -> None:
    store = LocalArtifactStore(tmp_path)
    _write(store, "old")
    pause = tmp_path / "pause"
    pause.mkdir()
    child = _child(tmp_path, "slow", "before_publish", mode, pause)
    try:
        deadline = time.monotonic() + 60
        while not (pause / "reached").exists():
            assert child.poll() is None and time.monotonic() < deadline, "the slow writer never reached its publish"
            time.sleep(0.01)
        live = Path((pause / "reached").read_text())
        _write(store, "fast")  # sweeps the key's leftovers while the slow writer is alive
        assert sorted(p.name for p in live.iterdir()) == [f"f{i:03d}.txt" for i in range(FILES)]
        (pause / "go").touch()
        assert child.wait(timeout=60) == 0
    finally:
        if child.poll() is None:
            child.kill()
    assert _contents(store) == {"slow"}
    assert _siblings(store) == ["train"]


WRITER = r"""
import sys, time
from pathlib import Path
from kiln.tasks.storage import publish
from kiln.tasks.storage.artifacts import LocalArtifactStore

root, key, value, mode, rounds, files, start = sys.argv[1:]
publish._use_exchange = mode == "exchange"
store = LocalArtifactStore(root)
while not Path(start).exists():
    time.sleep(0.001)
for r in range(int(rounds)):
    with store.writer(key) as out:
        for i in range(int(files)):
            (out / f"f{i:03d}.txt").write_text(f"{value}")
"""

# Counts the reads that found the key missing. (A listing that straddles a publish may see the replaced contents
# shrink as they are removed: the guarantee is about the key, not about a folder already being read.)
READER = r"""
import sys
from pathlib import Path
from kiln.tasks.storage import publish
from kiln.tasks.storage.artifacts import ArtifactNotFoundError, LocalArtifactStore

root, key, mode, stop = sys.argv[1:]
publish._use_exchange = mode == "exchange"
store = LocalArtifactStore(root)
reads = missing = 0
while not Path(stop).exists():
    reads += 2
    missing += not store.exists(key)
    try:
        store.path(key)
    except ArtifactNotFoundError:
        missing += 1
print(reads, missing)
"""


def test_concurrent_writers_end_with_one_complete_output(tmp_path: Path, mode: str) -> None:
    store = LocalArtifactStore(tmp_path)
    _write(store, "first")
    start, stop = tmp_path / "start", tmp_path / "stop"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), KEY, name, mode, "30", str(FILES),
                                 str(start)], stderr=subprocess.PIPE) for name in ("a", "b")]
    reader = subprocess.Popen([sys.executable, "-c", READER, str(tmp_path), KEY, mode, str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        start.touch()
        errors = [w.communicate(timeout=120)[1].decode()[-2000:] for w in writers]
        assert [w.returncode for w in writers] == [0, 0], errors
    finally:
        stop.touch()
        for w in writers:
            if w.poll() is None:
                w.kill()
    out, err = reader.communicate(timeout=60)
    reads, missing = map(int, out.split()) if reader.returncode == 0 else (0, -1)
    assert (missing, reader.returncode) == (0, 0), f"{missing} of {reads} reads found no key: {err.decode()[-2000:]}"
    assert _contents(store) in ({"a"}, {"b"})
    assert _siblings(store) == ["train"]


def test_exchange_is_what_this_filesystem_does(tmp_path: Path) -> None:
    """The ``exchange`` cases above test the exchange only where the filesystem has it (ext4, xfs, btrfs, tmpfs)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").touch()
    if not publish._exchange(a, b):
        pytest.skip(f"{tmp_path} refuses RENAME_EXCHANGE: the exchange cases ran the two-rename fallback")
    assert [p.name for p in b.iterdir()] == ["x"] and not any(a.iterdir())
    assert os.uname().sysname == "Linux"
