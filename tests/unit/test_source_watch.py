"""The source watcher's diff and state: new or changed parts start one event each, a restarted watcher (a new
instance on the saved state) neither repeats a committed change nor misses one made while it was down, and a SQL
watermark starts an event only when it grows."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from kiln.tasks.sources.watch import STATE_FILE, SourceWatcher, WatchError, load_state, watch_key
from kiln.tasks.spec import SourceSpec
from kiln.tasks.storage.artifacts import LocalArtifactStore, read_json

PIPELINE = "watched"


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "day=1.csv").write_text("a,b\n1,2\n")
    return data


def _watcher(store: LocalArtifactStore, uri: Path | str, tmp_path: Path) -> SourceWatcher:
    source = SourceSpec(uri=str(uri), watch={"interval_s": 5})
    return SourceWatcher(source=source, pipeline=PIPELINE, store=store, roots=(tmp_path,))


def test_first_look_records_a_baseline_without_an_event(store, folder, tmp_path) -> None:
    observation = _watcher(store, folder, tmp_path).poll()
    assert observation.payload is None
    saved = read_json(store.path(watch_key(PIPELINE)) / STATE_FILE)
    assert list(saved["parts"]) == ["day=1.csv"] and saved["source"] == str(folder)


def test_a_new_partition_is_one_event_naming_only_it(store, folder, tmp_path) -> None:
    watcher = _watcher(store, folder, tmp_path)
    watcher.poll()
    (folder / "day=2.csv").write_text("a,b\n3,4\n")
    observation = watcher.poll()
    assert observation.payload is not None
    assert observation.payload["uri"] == str(folder) and observation.payload["root"] == str(folder)
    [part] = observation.payload["parts"]
    assert part["name"] == "day=2.csv" and part["size"] == 8 and len(part["etag"]) == 64
    assert watcher.poll().payload is None, "the same change must not be emitted twice"


def test_a_rewritten_file_is_a_change(store, folder, tmp_path) -> None:
    watcher = _watcher(store, folder / "day=1.csv", tmp_path)
    watcher.poll()
    (folder / "day=1.csv").write_text("a,b\n1,3\n")  # same size, other bytes
    observation = watcher.poll()
    assert observation.payload is not None and [p["name"] for p in observation.payload["parts"]] == ["day=1.csv"]


def test_a_restart_does_not_repeat_a_committed_change(store, folder, tmp_path) -> None:
    first = _watcher(store, folder, tmp_path)
    first.poll()
    (folder / "day=2.csv").write_text("a,b\n3,4\n")
    observation = first.poll()
    first.commit(observation.state)
    assert _watcher(store, folder, tmp_path).poll().payload is None


def test_a_restart_emits_again_a_change_whose_event_was_not_stored(store, folder, tmp_path) -> None:
    first = _watcher(store, folder, tmp_path)
    first.poll()
    (folder / "day=2.csv").write_text("a,b\n3,4\n")
    assert first.poll().payload is not None  # emitted, never confirmed: not committed
    again = _watcher(store, folder, tmp_path).poll()
    assert again.payload is not None and [p["name"] for p in again.payload["parts"]] == ["day=2.csv"]


def test_rewind_emits_again_from_the_saved_state(store, folder, tmp_path) -> None:
    watcher = _watcher(store, folder, tmp_path)
    watcher.poll()
    (folder / "day=2.csv").write_text("a,b\n3,4\n")
    assert watcher.poll().payload is not None
    watcher.rewind()
    assert watcher.poll().payload is not None


def test_a_change_made_while_no_watcher_ran_is_seen_at_the_next_look(store, folder, tmp_path) -> None:
    _watcher(store, folder, tmp_path).poll()
    (folder / "day=2.csv").write_text("a,b\n3,4\n")
    observation = _watcher(store, folder, tmp_path).poll()
    assert observation.payload is not None and [p["name"] for p in observation.payload["parts"]] == ["day=2.csv"]


def test_a_removed_partition_is_recorded_without_an_event(store, folder, tmp_path) -> None:
    (folder / "day=2.csv").write_text("a,b\n3,4\n")
    watcher = _watcher(store, folder, tmp_path)
    watcher.poll()
    (folder / "day=2.csv").unlink()
    assert watcher.poll().payload is None
    state = load_state(store, PIPELINE)
    assert state is not None and state.parts is not None and list(state.parts) == ["day=1.csv"]


def test_the_state_of_another_source_is_a_new_baseline(store, folder, tmp_path) -> None:
    _watcher(store, folder, tmp_path).poll()
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.csv").write_text("a\n1\n")
    assert _watcher(store, other, tmp_path).poll().payload is None


def test_an_empty_folder_is_waited_on_and_its_first_partition_starts_a_run(store, tmp_path) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    watcher = _watcher(store, landing, tmp_path)
    assert watcher.poll().payload is None  # no error: nothing delivered yet
    assert load_state(store, PIPELINE).parts == {}
    (landing / "day=1.csv").write_text("a,b\n1,2\n")
    observation = watcher.poll()
    assert observation.payload is not None and [p["name"] for p in observation.payload["parts"]] == ["day=1.csv"]
    assert observation.payload["root"] == str(landing)


def test_an_unreadable_source_names_it(store, tmp_path) -> None:
    from kiln.tasks.sources.errors import SourceReadError

    with pytest.raises(SourceReadError, match="does not exist"):
        _watcher(store, tmp_path / "missing.csv", tmp_path).poll()


# SQL watermark ------------------------------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "rows.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE events (id INTEGER, updated_at TEXT)")
        conn.execute("INSERT INTO events VALUES (1, '2026-12-01T00:00:00')")
    return path


QUERY = "SELECT id, updated_at FROM events WHERE updated_at < :data_interval_end"


def _sql_watcher(store: LocalArtifactStore, db: Path, column: str = "updated_at", query: str = QUERY) -> SourceWatcher:
    source = SourceSpec(sql={"conn_id": "rows", "query": query, "watermark_column": column}, watch={"interval_s": 5})
    return SourceWatcher(source=source, pipeline=PIPELINE, store=store,
                         connection_url=lambda conn_id: f"sqlite:///{db}")


def _insert(db: Path, row_id: int, updated_at: str) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO events VALUES (?, ?)", (row_id, updated_at))


def test_a_larger_watermark_is_one_event(store, db) -> None:
    watcher = _sql_watcher(store, db)
    assert watcher.poll().payload is None
    _insert(db, 2, "2026-12-02T00:00:00")
    observation = watcher.poll()
    assert observation.payload == {"uri": f"sql://rows/{PIPELINE}", "watermark": "2026-12-02T00:00:00",
                                   "previous": "2026-12-01T00:00:00"}
    watcher.commit(observation.state)
    assert watcher.poll().payload is None
    assert _sql_watcher(store, db).poll().payload is None, "a restarted watcher repeated a committed watermark"


def test_a_numeric_watermark_compares_as_numbers(store, db) -> None:
    watcher = _sql_watcher(store, db, column="id")
    watcher.poll()
    _insert(db, 10, "2026-11-01T00:00:00")  # 10 > 1 as a number, not as text
    observation = watcher.poll()
    assert observation.payload is not None and observation.payload["watermark"] == 10


def test_a_lower_watermark_becomes_the_mark_without_an_event(store, db) -> None:
    _insert(db, 2, "2026-12-05T00:00:00")
    watcher = _sql_watcher(store, db)
    watcher.poll()
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM events WHERE id = 2")
    assert watcher.poll().payload is None
    _insert(db, 3, "2026-12-03T00:00:00")  # above the new mark, below the deleted row's
    assert watcher.poll().payload is not None


def test_a_watermark_column_the_query_lacks_is_named_with_the_columns(store, db) -> None:
    with pytest.raises(WatchError) as raised:
        _sql_watcher(store, db, column="changed_at").poll()
    message = str(raised.value)
    assert "'changed_at'" in message and "id, updated_at" in message and "connection 'rows'" in message
    assert not store.exists(watch_key(PIPELINE)), "nothing may be saved when the look fails"


def test_a_removal_while_a_change_awaits_its_commit_saves_nothing(store, folder, tmp_path) -> None:
    (folder / "day=2.csv").write_text("a,b\n3,4\n")
    watcher = _watcher(store, folder, tmp_path)
    watcher.poll()
    (folder / "day=3.csv").write_text("a,b\n5,6\n")
    change = watcher.poll()
    assert change.payload is not None
    (folder / "day=2.csv").unlink()
    assert watcher.poll().payload is None
    saved = load_state(store, PIPELINE)
    assert saved is not None and saved.parts is not None and "day=3.csv" not in saved.parts, (
        "a change was saved before its event was stored")
    watcher.commit(change.state)
    assert _watcher(store, folder, tmp_path).poll().payload is None


def test_ingest_accepts_the_payload_as_the_parts_that_started_the_run(store, folder, tmp_path) -> None:
    """The event's payload is what ``ingest`` checks against its own listing (the run reads what caused it)."""
    from kiln.tasks.sources.incremental import check_events
    from kiln.tasks.sources.listing import list_source

    watcher = _watcher(store, folder, tmp_path)
    watcher.poll()
    (folder / "day=2.csv").write_text("a,b\n3,4\n")
    payload = watcher.poll().payload
    assert payload is not None
    listing = list_source(watcher.source, (tmp_path,))
    assert check_events(listing, [payload]) == [listing.part("day=2.csv").to_dict()]
