"""The train/val/test split of the cleaned rows, and the files ``build_features`` writes it to.

Each split is one Parquet file with float32 feature columns ``f0..f{d-1}`` and the encoded label column
``target``; ``feature_spec.json`` beside them holds the fitted :class:`~kiln.tasks.features.transform.FeatureTransform`
and the split's sizes. Training ranks, ``evaluate``, ``gate`` and the bundle export read them with
:func:`load_split`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from kiln.tasks.features.transform import FEATURE_SPEC_FILE
from kiln.tasks.storage.artifacts import read_json

TRAIN_FILE = "train.parquet"
VAL_FILE = "val.parquet"
TEST_FILE = "test.parquet"
#: The raw test rows (input columns as the source had them), for scoring champions and serving parity checks.
TEST_RAW_FILE = "test_raw.parquet"
#: Name of the encoded label column in the split files (the feature columns are ``f0..f{d-1}``).
TARGET_COLUMN = "target"
SPLIT_FILES = {"train": TRAIN_FILE, "val": VAL_FILE, "test": TEST_FILE}
Split = Literal["train", "val", "test"]


def split_index(target: pd.Series, task: str, test_fraction: float, val_fraction: float,
                seed: int) -> dict[Split, np.ndarray]:
    """Seeded train/val/test split of the rows whose labels are ``target``: carve ``test_fraction`` first, then
    ``val_fraction`` of the whole. Classification splits are stratified by the label.

    Returns:
        Split name -> row numbers, in the split's (shuffled) order.

    Raises:
        ValueError: a class has too few rows to stratify, or a split cannot be carved; the message says which.
    """
    labels = target.astype("string").reset_index(drop=True) if task == "classification" else None
    index = np.arange(len(target))
    rest, test = _split_once(index, labels, test_fraction, seed, "test")
    val = np.array([], dtype=index.dtype)
    if val_fraction > 0:
        rest_labels = labels.iloc[rest] if labels is not None else None
        rest, val = _split_once(rest, rest_labels, val_fraction / (1 - test_fraction), seed, "val")
    return {"train": rest, "val": val, "test": test}


def load_split(features_dir: Path, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """One split as ``(X float32 [n, d], y)``; ``y`` is int64 class indices or float32 regression values.

    Raises:
        FileNotFoundError: the folder lacks the split file or ``feature_spec.json``.
        ValueError: an unknown split, or a file whose columns do not match the feature spec.
    """
    x, y, _ = load_shard(features_dir, split, 0, 1)
    return x, y


def load_shard(features_dir: Path, split: Split, rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Rank ``rank``'s contiguous share of a split (sizes differ by at most one row between ranks), reading only
    the Parquet row groups that hold it; the rows of a split file are in shuffled order, so a share is a random
    sample. ``load_shard(d, s, 0, 1)`` is the whole split.

    Returns:
        ``(X float32 [m, d], y, rows in the whole split)``; ``y`` as in :func:`load_split`.

    Raises:
        FileNotFoundError: the folder lacks the split file or ``feature_spec.json``.
        ValueError: an unknown split, a rank outside ``0..world_size-1``, or a file whose columns do not match
            the feature spec.
    """
    import pyarrow.parquet as pq

    from kiln.tasks.features.batches import iter_row_range, shard_range

    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {list(SPLIT_FILES)}, found {split!r}")
    features_dir = Path(features_dir)
    path = features_dir / SPLIT_FILES[split]
    for name in (FEATURE_SPEC_FILE, SPLIT_FILES[split]):
        if not (features_dir / name).is_file():
            raise FileNotFoundError(f"{features_dir / name} does not exist; run build_features first")
    spec = read_json(features_dir / FEATURE_SPEC_FILE)
    pf = pq.ParquetFile(path)
    expected = [f"f{i}" for i in range(spec["input_dim"])] + [TARGET_COLUMN]
    if pf.schema_arrow.names != expected:
        raise ValueError(f"{path} has {len(pf.schema_arrow.names)} columns but "
                         f"{FEATURE_SPEC_FILE} expects f0..f{spec['input_dim'] - 1} and '{TARGET_COLUMN}'; "
                         "rerun build_features")
    n = pf.metadata.num_rows
    start, stop = shard_range(n, rank, world_size)
    # Row-major float32, filled one row group at a time: the whole shard is never held twice.
    x = np.empty((stop - start, len(expected) - 1), dtype=np.float32)
    y = np.empty(stop - start, dtype=np.int64 if spec["task"] == "classification" else np.float32)
    for offset, table in iter_row_range(path, start, stop):
        rows = slice(offset, offset + table.num_rows)
        for i, name in enumerate(expected[:-1]):
            x[rows, i] = table.column(name).to_numpy()
        y[rows] = table.column(TARGET_COLUMN).to_numpy()
    return x, y, n


def _split_once(index: np.ndarray, labels: pd.Series | None, fraction: float, seed: int,
                split: str) -> tuple[np.ndarray, np.ndarray]:
    # Imported here, not at module level: training ranks import this module for load_split, and scikit-learn
    # would add ~1.7 s to every rank's start-up.
    from sklearn.model_selection import train_test_split

    if labels is not None:
        counts = labels.value_counts()
        rare = {str(k): int(v) for k, v in counts[counts < 2].items()}
        if rare:
            where = "the cleaned rows" if split == "test" else "the rows left after carving the test split"
            raise ValueError(f"cannot stratify the {split} split: class(es) {rare} (label: rows) have fewer than "
                             f"2 rows in {where}; drop those classes or collect more data for them")
    try:
        kept, carved = train_test_split(index, test_size=fraction, random_state=seed,
                                        stratify=_label_codes(labels) if labels is not None else None)
    except ValueError as exc:  # sklearn's message lacks which split and how large
        raise ValueError(f"cannot carve the {split} split ({fraction:.3g} of {len(index)} rows): {exc}; "
                         "adjust features.test_fraction / val_fraction or collect more data") from exc
    return kept, carved


def _label_codes(labels: pd.Series) -> np.ndarray:
    """Labels as integer codes in sorted label order: the same strata, hence the same split, as the labels
    themselves (scikit-learn ranks the classes by sorting them too), without an object array of 10 M strings."""
    if labels.isna().any():
        return labels.to_numpy()
    return pd.factorize(labels, sort=True)[0]
