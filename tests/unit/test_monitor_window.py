"""Reading a window of captured traffic and feedback back from the artifact store, in the model server's layout:
rows outside the window, other versions and writers' temporary folders are left out; a corrupt batch or one of an
unknown version is skipped and reported, never fatal; labels join their records."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from monitor_fixtures import (
    PIPELINE,
    T0,
    capture_table,
    feedback_table,
    publish,
    publish_capture,
    publish_feedback,
    train_and_live,
)

from kiln.tasks.monitoring.window import (
    CAPTURE_COLUMNS,
    CAPTURE_FILE,
    FEEDBACK_FILE,
    capture_key,
    feedback_key,
    join_labels,
    read_captures,
    read_feedback,
    window_hours,
)
from kiln.tasks.serving import capture_format as server
from kiln.tasks.storage.artifacts import LocalArtifactStore

HOUR = timedelta(hours=1)


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "store")


@pytest.fixture
def live() -> pa.Table:
    return capture_table(train_and_live()[1].head(120), step=timedelta(minutes=1))  # 60 requests over an hour


def test_the_layout_is_the_model_servers(store: LocalArtifactStore) -> None:
    hour = server.hour_of((T0 + timedelta(minutes=59)).timestamp())
    assert f"{capture_key(PIPELINE, 'v1', T0 + timedelta(minutes=59))}/b" == server.capture_key(PIPELINE, "v1",
                                                                                                 hour, "b")
    assert f"{feedback_key(PIPELINE, T0)}/b" == server.feedback_key(PIPELINE, hour, "b")
    assert (CAPTURE_FILE, FEEDBACK_FILE) == (server.CAPTURE_FILE, server.FEEDBACK_FILE)
    assert CAPTURE_COLUMNS == server.FIXED_COLUMNS


def test_a_window_reads_the_batches_of_its_hours_and_keeps_the_rows_inside_it(store: LocalArtifactStore,
                                                                              live: pa.Table) -> None:
    for i in range(3):  # one batch per hour, each with 60 requests a minute apart
        publish_capture(store, capture_table(train_and_live()[1].head(120), start=T0 + i * HOUR,
                                             step=timedelta(minutes=1)), hour=T0 + i * HOUR, seq=i)
    read = read_captures(store, PIPELINE, ["v1"], T0 + timedelta(minutes=30), T0 + 2 * HOUR)
    assert len(read.files) == 2 and read.skipped == []  # the third hour is outside the window
    assert read.rows == 2 * 30 + 2 * 60  # the last 30 requests of hour 0, all of hour 1, two records each
    assert read.frame["received_at"].min() == T0 + timedelta(minutes=30)
    assert read.frame["received_at"].max() < T0 + 2 * HOUR
    assert set(CAPTURE_COLUMNS) | {"body_mass_g", "island"} <= set(read.frame.columns)


def test_only_the_versions_asked_for_are_read_and_inputs_of_each_are_kept(store: LocalArtifactStore,
                                                                           live: pa.Table) -> None:
    publish_capture(store, live, version="v1", seq=1)
    canary = capture_table(train_and_live()[1].head(10), version="v2").drop_columns(["year"])
    publish_capture(store, canary.append_column("colour", pa.array(["red"] * 10)), version="v2", seq=2)
    assert read_captures(store, PIPELINE, ["v1"], T0, T0 + HOUR).rows == 120
    both = read_captures(store, PIPELINE, ["v1", "v2"], T0, T0 + HOUR)
    assert both.rows == 130 and both.frame["version"].value_counts().to_dict() == {"v1": 120, "v2": 10}
    # Columns one version lacks are null in its rows.
    assert both.frame.loc[both.frame["version"] == "v2", "year"].isna().all()
    assert both.frame.loc[both.frame["version"] == "v1", "colour"].isna().all()


def test_a_corrupt_batch_or_one_of_an_unknown_version_is_skipped_and_reported(store: LocalArtifactStore,
                                                                               live: pa.Table) -> None:
    good = publish_capture(store, live, seq=1)
    corrupt = f"{PIPELINE}/_capture/version=v1/hour=2026-12-07T03/corrupt"
    publish(store, corrupt, CAPTURE_FILE, b"PAR1 this is not parquet")
    stranger = publish_capture(store, capture_table(train_and_live()[1].head(4), version="v9"), folder_version="v1",
                               seq=2)
    partial = publish_capture(store, live.drop_columns(["received_at"]), seq=3)
    empty = f"{PIPELINE}/_capture/version=v1/hour=2026-12-07T03/empty"
    with store.writer(empty):
        pass
    read = read_captures(store, PIPELINE, ["v1"], T0, T0 + HOUR)
    assert read.files == [good] and read.rows == 120
    reasons = {s.key: s.reason for s in read.skipped}
    assert set(reasons) == {corrupt, stranger, partial, empty}
    assert reasons[corrupt].startswith("corrupt capture.parquet")
    assert reasons[stranger] == "its version column holds 'v9', its folder says 'v1'"
    assert reasons[partial] == "capture.parquet lacks the columns received_at"
    assert reasons[empty] == "no capture.parquet in the batch"


def test_an_empty_window_has_no_rows_but_the_columns(store: LocalArtifactStore, live: pa.Table) -> None:
    publish_capture(store, live, seq=1)
    read = read_captures(store, PIPELINE, ["v1"], T0 + 5 * HOUR, T0 + 6 * HOUR)
    assert (read.rows, read.files, read.skipped) == (0, [], [])
    assert list(read.frame.columns) == list(CAPTURE_COLUMNS)
    assert read_captures(store, "another_pipeline", ["v1"], T0, T0 + HOUR).rows == 0


def test_temporary_folders_of_writers_are_not_batches(store: LocalArtifactStore, live: pa.Table) -> None:
    key = publish_capture(store, live, seq=1)
    (store.root / key).parent.joinpath(".tmp-somebatch-0123456789abcdef").mkdir()
    assert store.children(key.rsplit("/", 1)[0]) == [key.rsplit("/", 1)[1]]


@pytest.mark.parametrize(("start", "end", "message"), [
    (datetime(2026, 12, 7, 3), T0 + HOUR, "has no timezone"),
    (T0 + HOUR, T0, "ends .* before it starts")], ids=["naive", "backwards"])
def test_a_window_must_be_utc_and_forwards(store: LocalArtifactStore, start: datetime, end: datetime,
                                           message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_captures(store, PIPELINE, ["v1"], start, end)


def test_window_hours_cover_partial_hours() -> None:
    hours = list(window_hours(T0 + timedelta(minutes=59), T0 + timedelta(hours=2, minutes=1)))
    assert hours == [T0, T0 + HOUR, T0 + 2 * HOUR]


def test_labels_join_their_records_and_a_correction_wins(store: LocalArtifactStore, live: pa.Table) -> None:
    publish_capture(store, live, seq=1)
    labels = live["predicted_class"].to_pylist()
    publish_feedback(store, feedback_table(live.slice(0, 100), labels[:100]), seq=1)
    # A later correction for the first record, and feedback for a request this window never captured.
    later = T0 + timedelta(hours=1, minutes=5)
    correction = pa.table({"request_id": ["req000000", "elsewhere"], "record": pa.array([0, 0], pa.int32()),
                           "label": ["Gentoo", "Adelie"],
                           "received_at": pa.array([later, later], pa.timestamp("us", "UTC"))})
    publish_feedback(store, correction, hour=T0 + HOUR, seq=2)
    captures = read_captures(store, PIPELINE, ["v1"], T0, T0 + HOUR)
    feedback = read_feedback(store, PIPELINE, T0, T0 + 2 * HOUR)
    assert feedback.rows == 102 and len(feedback.files) == 2
    joined = join_labels(captures.frame, feedback.frame)
    assert len(joined) == 120 and joined["label"].notna().sum() == 100
    assert joined.loc[0, "label"] == "Gentoo"
    assert joined["label"].iloc[1:100].tolist() == labels[1:100]
    assert joined["label"].iloc[100:].isna().all()


def test_a_corrupt_feedback_batch_is_skipped_and_reported(store: LocalArtifactStore, live: pa.Table) -> None:
    bad = f"{PIPELINE}/_feedback/hour=2026-12-07T03/bad"
    publish(store, bad, FEEDBACK_FILE, b"\x00" * 64)
    read = read_feedback(store, PIPELINE, T0, T0 + HOUR)
    assert read.rows == 0 and [s.key for s in read.skipped] == [bad]
