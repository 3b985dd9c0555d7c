"""Penguins traffic for the monitoring tests: a training baseline in the bundle's format and captured and feedback
batches published in the model server's format (kiln.tasks.serving.capture), built here from the real data."""

from __future__ import annotations

import importlib.resources
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kiln.tasks.bundle.baseline import Baseline
from kiln.tasks.features.profile import profile_parquet
from kiln.tasks.storage.artifacts import ArtifactStore

PIPELINE = "penguins_species"
TARGET = "species"
NUMERIC = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"]
# year is declared categorical in the spec: the server captures it as text, while training kept the raw integers.
CATEGORICAL = ["island", "sex", "year"]
INPUTS = ["island", "bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g", "sex", "year"]
T0 = datetime(2026, 12, 7, 3, 0, tzinfo=UTC)


def penguins() -> pd.DataFrame:
    """The 344 rows of the palmerpenguins CSV, as kiln's example spec reads them."""
    return pd.read_csv(importlib.resources.files("palmerpenguins") / "data" / "penguins.csv")


def train_and_live(seed: int = 0, train_share: float = 0.6) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A seeded split: the rows the model was trained from, and unseen rows of the same population as traffic."""
    df = penguins()
    order = np.random.default_rng(seed).permutation(len(df))
    cut = int(len(df) * train_share)
    return df.iloc[order[:cut]].reset_index(drop=True), df.iloc[order[cut:]].reset_index(drop=True)


def make_baseline(folder: Path, train: pd.DataFrame, accuracy: float = 0.97) -> Baseline:
    """The bundle baseline of a model trained on ``train``: profile and sample of the raw inputs, the predicted
    class shares (here the species shares) and the test accuracy."""
    folder.mkdir(parents=True, exist_ok=True)
    sample = folder / "baseline_sample.parquet"
    train[INPUTS].to_parquet(sample, index=False)
    shares = train[TARGET].value_counts(normalize=True).to_dict()
    return Baseline(profile=profile_parquet(sample), predictions={"kind": "classes", "shares": shares},
                    metrics={"primary": "accuracy", "value": accuracy, "all": {"accuracy": accuracy}},
                    sample_path=sample, sample_rows=len(train), created_at=T0.isoformat())


def capture_table(rows: pd.DataFrame, version: str = "v1", start: datetime = T0, step: timedelta =
                  timedelta(seconds=10), records_per_request: int = 2, first_request: int = 0,
                  variant: str = "champion") -> pa.Table:
    """Captured rows in the server's format: one row per record, predicted class = the true species; the request
    ids count from ``first_request`` (another batch of the same window starts where the last one ended)."""
    n = len(rows)
    request = [f"req{first_request + i // records_per_request:06d}" for i in range(n)]
    columns: dict[str, pa.Array] = {
        "request_id": pa.array(request, pa.string()),
        "record": pa.array([i % records_per_request for i in range(n)], pa.int32()),
        "received_at": pa.array([start + step * (i // records_per_request) for i in range(n)],
                                pa.timestamp("us", "UTC")),
        "version": pa.array([version] * n, pa.string()),
        "variant": pa.array([variant] * n, pa.string())}
    for name in INPUTS:
        if name in NUMERIC:
            columns[name] = pa.array(rows[name].astype("float64").tolist(), pa.float64())
        else:
            columns[name] = pa.array([None if pd.isna(v) else str(v) for v in rows[name]], pa.string())
    columns["predicted_class"] = pa.array(rows[TARGET].astype(str).tolist(), pa.string())
    columns["predicted_value"] = pa.array([0.9] * n, pa.float64())
    return pa.table(columns)


def feedback_table(table: pa.Table, labels: list[str], start: datetime = T0 + timedelta(minutes=30)) -> pa.Table:
    """Feedback for every captured record of ``table``: ``labels`` in its row order."""
    return pa.table({"request_id": table["request_id"], "record": table["record"],
                     "label": pa.array(labels, pa.string()),
                     "received_at": pa.array([start] * table.num_rows, pa.timestamp("us", "UTC"))})


def batch_id(seq: int, when: datetime = T0) -> str:
    return f"{when:%Y%m%dT%H%M%S}-0a1b2c3d-{seq:06d}"


def publish(store: ArtifactStore, key: str, filename: str, table: pa.Table | bytes) -> None:
    """Publish one batch folder as the server does (``store.writer``), holding ``filename``."""
    with store.writer(key) as folder:
        if isinstance(table, bytes):
            (folder / filename).write_bytes(table)
        else:
            pq.write_table(table, folder / filename)


def publish_capture(store: ArtifactStore, table: pa.Table, version: str = "v1", hour: datetime = T0, seq: int = 1,
                    folder_version: str | None = None) -> str:
    """Publish a captured batch under its version and hour; returns its key."""
    key = (f"{PIPELINE}/_capture/version={folder_version or version}/hour={hour:%Y-%m-%dT%H}/"
           f"{batch_id(seq, hour)}")
    publish(store, key, "capture.parquet", table)
    return key


def publish_feedback(store: ArtifactStore, table: pa.Table, hour: datetime = T0, seq: int = 1) -> str:
    """Publish a feedback batch under its hour; returns its key."""
    key = f"{PIPELINE}/_feedback/hour={hour:%Y-%m-%dT%H}/{batch_id(seq, hour)}"
    publish(store, key, "feedback.parquet", table)
    return key


def read_labelled(path: Path) -> pd.DataFrame:
    """A monitor's labelled.parquet, checked to hold the monitor's types: captured numbers as float64, captured
    text and the label as strings."""
    table = pq.read_table(path)
    for name in [*INPUTS, TARGET]:
        expected = pa.float64() if name in NUMERIC else pa.string()
        assert table.schema.field(name).type == expected, (name, table.schema.field(name).type)
    return table.to_pandas()
