"""The train/val/test split of the cleaned rows, and the files ``build_features`` writes it to.

Each split is one Parquet file with float32 feature columns ``f0..f{d-1}`` and the encoded label column
``target``; ``feature_spec.json`` beside them holds the fitted :class:`~kiln.tasks.features.transform.FeatureTransform`
and the split's sizes. Training ranks, ``evaluate``, ``gate`` and the bundle export read them with
:func:`load_split`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from kiln.tasks.features.transform import FEATURE_SPEC_FILE
from kiln.tasks.storage.artifacts import read_json

if TYPE_CHECKING:
    from kiln.tasks.features.transform import FeatureTransform

TRAIN_FILE = "train.parquet"
VAL_FILE = "val.parquet"
TEST_FILE = "test.parquet"
#: The raw test rows (input columns as the source had them), for scoring champions and serving parity checks.
TEST_RAW_FILE = "test_raw.parquet"
#: Name of the encoded label column in the split files (the feature columns are ``f0..f{d-1}``).
TARGET_COLUMN = "target"
SPLIT_FILES = {"train": TRAIN_FILE, "val": VAL_FILE, "test": TEST_FILE}
Split = Literal["train", "val", "test"]


def split_rows(df: pd.DataFrame, target: str, task: str, test_fraction: float, val_fraction: float,
               seed: int) -> dict[Split, pd.DataFrame]:
    """Seeded train/val/test split: carve ``test_fraction`` first, then ``val_fraction`` of the whole.

    Classification splits are stratified by the label.

    Raises:
        ValueError: a class has too few rows to stratify, or a split cannot be carved; the message says which.
    """
    labels = df[target].astype("string") if task == "classification" else None
    index = np.arange(len(df))
    rest, test = _split_once(index, labels, test_fraction, seed, "test")
    val = np.array([], dtype=index.dtype)
    if val_fraction > 0:
        rest_labels = labels.iloc[rest] if labels is not None else None
        rest, val = _split_once(rest, rest_labels, val_fraction / (1 - test_fraction), seed, "val")
    return {"train": df.iloc[rest].reset_index(drop=True), "val": df.iloc[val].reset_index(drop=True),
            "test": df.iloc[test].reset_index(drop=True)}


def write_splits(parts: dict[Split, pd.DataFrame], transform: FeatureTransform, out_dir: Path) -> None:
    """Write each split as features + encoded target, and the raw test rows."""
    names = [f"f{i}" for i in range(transform.input_dim)]
    for split, part in parts.items():
        frame = pd.DataFrame(transform.transform(part), columns=names)
        frame[TARGET_COLUMN] = transform.encode_target(part[transform.target])
        frame.to_parquet(out_dir / SPLIT_FILES[split], index=False)
    parts["test"].to_parquet(out_dir / TEST_RAW_FILE, index=False)


def load_split(features_dir: Path, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """One split as ``(X float32 [n, d], y)``; ``y`` is int64 class indices or float32 regression values.

    Raises:
        FileNotFoundError: the folder lacks the split file or ``feature_spec.json``.
        ValueError: an unknown split, or a file whose columns do not match the feature spec.
    """
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {list(SPLIT_FILES)}, found {split!r}")
    features_dir = Path(features_dir)
    for name in (FEATURE_SPEC_FILE, SPLIT_FILES[split]):
        if not (features_dir / name).is_file():
            raise FileNotFoundError(f"{features_dir / name} does not exist; run build_features first")
    spec = read_json(features_dir / FEATURE_SPEC_FILE)
    df = pd.read_parquet(features_dir / SPLIT_FILES[split])
    expected = [f"f{i}" for i in range(spec["input_dim"])] + [TARGET_COLUMN]
    if list(df.columns) != expected:
        raise ValueError(f"{features_dir / SPLIT_FILES[split]} has {len(df.columns)} columns but "
                         f"{FEATURE_SPEC_FILE} expects f0..f{spec['input_dim'] - 1} and '{TARGET_COLUMN}'; "
                         "rerun build_features")
    # copy=True: pandas' copy-on-write hands out read-only views, which torch.as_tensor warns about.
    x = df[expected[:-1]].to_numpy(np.float32, copy=True)
    y_dtype = np.int64 if spec["task"] == "classification" else np.float32
    return x, df[TARGET_COLUMN].to_numpy(y_dtype, copy=True)


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
                                        stratify=labels.to_numpy() if labels is not None else None)
    except ValueError as exc:  # sklearn's message lacks which split and how large
        raise ValueError(f"cannot carve the {split} split ({fraction:.3g} of {len(index)} rows): {exc}; "
                         "adjust features.test_fraction / val_fraction or collect more data") from exc
    return kept, carved
