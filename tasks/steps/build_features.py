"""The ``build_features`` step: split cleaned rows, fit a feature transform on the train split, write matrices.

Input is the ``clean`` step's folder (``clean.parquet`` and ``clean_report.json``). Output is one parquet file per
split with float32 columns ``f0..f{d-1}`` and an encoded ``target`` column, the raw test rows for serving parity
checks, and ``feature_spec.json``: the fitted :class:`FeatureTransform` that serving reloads to transform a raw
record exactly as training did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd

from kiln.tasks.features.transform import (  # noqa: F401  (re-exported: the transform is part of this step's API)
    FORMAT_VERSION,
    UNKNOWN,
    CategoricalColumn,
    FeatureTransform,
    NumericColumn,
    require_columns,
)
from kiln.tasks.spec import FeaturesSpec, PipelineSpec, TaskType
from kiln.tasks.storage.artifacts import read_json, write_json

log = logging.getLogger(__name__)

TRAIN_FILE = "train.parquet"
VAL_FILE = "val.parquet"
TEST_FILE = "test.parquet"
TEST_RAW_FILE = "test_raw.parquet"
FEATURE_SPEC_FILE = "feature_spec.json"
#: Name of the encoded label column in the split files (the feature columns are ``f0..f{d-1}``).
TARGET_COLUMN = "target"
#: Input files written by the ``clean`` step.
CLEAN_FILE = "clean.parquet"
CLEAN_REPORT_FILE = "clean_report.json"

SPLIT_FILES = {"train": TRAIN_FILE, "val": VAL_FILE, "test": TEST_FILE}


@dataclass(frozen=True)
class FeaturesConfig:
    """Settings of the ``build_features`` step."""

    target: str
    """The label column; must equal the ``target`` in ``clean_report.json``."""
    task: TaskType
    """``classification`` (stratified split, labels encoded as class indices) or ``regression``."""
    features: FeaturesSpec
    """Split fractions, numeric scaling and the per-column category limit."""
    seed: int
    """Seed of the train/val/test split: the same seed on the same rows gives the same files."""

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("FeaturesConfig.target must name the label column")
        if self.task not in get_args(TaskType):
            raise ValueError(f"FeaturesConfig.task must be one of {get_args(TaskType)}, found {self.task!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"FeaturesConfig.seed must be a non-negative integer, found {self.seed!r}")

    @classmethod
    def from_spec(cls, spec: PipelineSpec) -> FeaturesConfig:
        """The config a pipeline spec implies (the split uses ``training.seed``)."""
        return cls(target=spec.target, task=spec.task, features=spec.features, seed=spec.training.seed)


@dataclass(frozen=True)
class FeaturesResult:
    """What ``build_features`` wrote."""

    n_train: int
    n_val: int
    n_test: int
    input_dim: int
    n_classes: int | None
    feature_names: tuple[str, ...]
    classes: tuple[str, ...] | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (e.g. for XCom)."""
        return {"n_train": self.n_train, "n_val": self.n_val, "n_test": self.n_test, "input_dim": self.input_dim,
                "n_classes": self.n_classes, "feature_names": list(self.feature_names),
                "classes": list(self.classes) if self.classes is not None else None}


def run_build_features(config: FeaturesConfig, clean_dir: Path, out_dir: Path) -> FeaturesResult:
    """Split the cleaned rows, fit the transform on train, and write the split files and ``feature_spec.json``.

    Args:
        config: the step's settings.
        clean_dir: the ``clean`` step's output folder.
        out_dir: an empty folder to write into (the caller publishes it).

    Raises:
        FileNotFoundError: an input file is missing.
        ValueError: the clean report disagrees with the config, or the rows cannot be split as asked.
    """
    clean_dir, out_dir = Path(clean_dir), Path(out_dir)
    df, column_types = _read_clean(config, clean_dir)
    parts = dict(zip(("train", "val", "test"), _split(df, config), strict=True))
    transform = FeatureTransform.fit(parts["train"], column_types, config.target, config.task,
                                     config.features.scaling, config.features.max_categories)
    names = [f"f{i}" for i in range(transform.input_dim)]
    for split, part in parts.items():
        frame = pd.DataFrame(transform.transform(part), columns=names)
        frame[TARGET_COLUMN] = transform.encode_target(part[config.target])
        frame.to_parquet(out_dir / SPLIT_FILES[split], index=False)
    parts["test"].to_parquet(out_dir / TEST_RAW_FILE, index=False)
    sizes = {f"n_{split}": len(part) for split, part in parts.items()}
    write_json(out_dir / FEATURE_SPEC_FILE, {**transform.to_dict(), "split": {
        **sizes, "seed": config.seed, "test_fraction": config.features.test_fraction,
        "val_fraction": config.features.val_fraction}})
    log.info("build_features: %d rows in -> train %d, val %d, test %d; %d features (%d numeric, %d categorical "
             "columns)", len(df), sizes["n_train"], sizes["n_val"], sizes["n_test"], transform.input_dim,
             len(transform.numeric), len(transform.categorical))
    return FeaturesResult(n_train=sizes["n_train"], n_val=sizes["n_val"], n_test=sizes["n_test"],
                          input_dim=transform.input_dim, n_classes=transform.n_classes,
                          feature_names=tuple(transform.feature_names), classes=transform.classes)


def load_split(features_dir: Path, split: Literal["train", "val", "test"]) -> tuple[np.ndarray, np.ndarray]:
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


def _read_clean(config: FeaturesConfig, clean_dir: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    for name in (CLEAN_FILE, CLEAN_REPORT_FILE):
        if not (clean_dir / name).is_file():
            raise FileNotFoundError(f"{clean_dir / name} does not exist; run the clean step first")
    report = read_json(clean_dir / CLEAN_REPORT_FILE)
    missing = [k for k in ("column_types", "target", "task") if k not in report]
    if missing:
        raise ValueError(f"{clean_dir / CLEAN_REPORT_FILE} lacks the key(s) {missing}; rerun the clean step")
    for field in ("target", "task"):
        if report[field] != getattr(config, field):
            raise ValueError(f"{clean_dir / CLEAN_REPORT_FILE} has {field} {report[field]!r} but the features "
                             f"config has {getattr(config, field)!r}; rerun clean with the current spec")
    df = pd.read_parquet(clean_dir / CLEAN_FILE).reset_index(drop=True)
    require_columns(df, [config.target], str(clean_dir / CLEAN_FILE))
    return df, dict(report["column_types"])


def _split(df: pd.DataFrame, config: FeaturesConfig) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Seeded train/val/test split: carve ``test_fraction`` first, then ``val_fraction`` of the whole."""
    spec = config.features
    labels = df[config.target].astype("string") if config.task == "classification" else None
    index = np.arange(len(df))
    rest, test = _split_once(index, labels, spec.test_fraction, config.seed, "test")
    val = np.array([], dtype=index.dtype)
    if spec.val_fraction > 0:
        rest_labels = labels.iloc[rest] if labels is not None else None
        rest, val = _split_once(rest, rest_labels, spec.val_fraction / (1 - spec.test_fraction), config.seed,
                                "val")
    return df.iloc[rest].reset_index(drop=True), df.iloc[val].reset_index(drop=True), \
        df.iloc[test].reset_index(drop=True)


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
