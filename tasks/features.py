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
from sklearn.model_selection import train_test_split

from tasks.artifacts import read_json, write_json
from tasks.spec import FeaturesSpec, PipelineSpec, TaskType

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
Scaling = Literal["standard", "minmax", "none"]
#: Version of the ``FeatureTransform.to_dict`` layout; ``from_dict`` refuses other versions.
FORMAT_VERSION = 1
UNKNOWN = "__unknown__"


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
class NumericColumn:
    """A numeric input: missing values become ``mean``, then ``(x - center) / scale``."""

    name: str
    mean: float
    center: float
    scale: float


@dataclass(frozen=True)
class CategoricalColumn:
    """A categorical input: one-hot over ``vocabulary`` plus a last unknown slot for nulls and unseen values."""

    name: str
    vocabulary: tuple[str, ...]


@dataclass(frozen=True)
class FeatureTransform:
    """Raw columns to a float32 matrix; statistics come from the train split only.

    Feature order is the numeric columns in source order (so image pixels keep their order), then one one-hot
    block per categorical column. A missing numeric value is replaced by the column's train mean before scaling,
    so it becomes 0 under ``standard`` scaling, ``(mean - min) / range`` under ``minmax`` and the mean itself
    under ``none``. A constant column gets scale 1 (no division by zero). Categorical values are compared as
    strings; nulls and values outside the vocabulary set the column's unknown slot.

    Classification labels are encoded as the index into ``classes`` (the sorted train labels, as strings).
    Regression targets stay unscaled floats and ``n_classes`` is ``None``.
    """

    task: TaskType
    target: str
    scaling: Scaling
    max_categories: int
    numeric: tuple[NumericColumn, ...]
    categorical: tuple[CategoricalColumn, ...]
    classes: tuple[str, ...] | None

    @classmethod
    def fit(cls, df: pd.DataFrame, column_types: dict[str, str], target: str, task: TaskType,
            scaling: Scaling, max_categories: int) -> FeatureTransform:
        """Fit on train rows.

        Args:
            df: the train split, including the target column.
            column_types: ``numeric`` / ``categorical`` (``ignore`` is skipped) per column; the target may appear.
            target: the label column.
            task: ``classification`` or ``regression``.
            scaling: ``standard``, ``minmax`` or ``none``.
            max_categories: the most frequent values kept per categorical column.

        Raises:
            ValueError: a declared column is missing, a type is unknown, a numeric column has no finite values,
                or a classification target has fewer than two classes.
        """
        if scaling not in get_args(Scaling):
            raise ValueError(f"scaling must be one of {get_args(Scaling)}, found {scaling!r}")
        _require_columns(df, [target, *(c for c, k in column_types.items() if k != "ignore")], "the train split")
        numeric, categorical = [], []
        for col in df.columns:  # source order, not the report's order
            kind = column_types.get(col)
            if col == target or kind in (None, "ignore"):
                continue
            if kind == "numeric":
                numeric.append(_fit_numeric(df[col], scaling))
            elif kind == "categorical":
                categorical.append(_fit_categorical(df[col], max_categories))
            else:
                raise ValueError(f"column '{col}' has type {kind!r}; allowed: numeric, categorical, ignore")
        classes = None
        if task == "classification":
            classes = tuple(sorted(df[target].dropna().astype("string").unique()))
            if len(classes) < 2:
                raise ValueError(f"target '{target}' has {len(classes)} class(es) {list(classes)} in the train "
                                 "split; classification needs at least 2: check the target column")
        return cls(task, target, scaling, max_categories, tuple(numeric), tuple(categorical), classes)

    @property
    def feature_names(self) -> list[str]:
        """One name per output column: numeric names, then ``col=value`` and ``col=__unknown__``."""
        names = [c.name for c in self.numeric]
        for c in self.categorical:
            names += [f"{c.name}={v}" for v in c.vocabulary] + [f"{c.name}={UNKNOWN}"]
        return names

    @property
    def input_dim(self) -> int:
        """Width of the feature matrix."""
        return len(self.numeric) + sum(len(c.vocabulary) + 1 for c in self.categorical)

    @property
    def n_classes(self) -> int | None:
        """Number of classes; ``None`` for regression."""
        return len(self.classes) if self.classes is not None else None

    @property
    def n_outputs(self) -> int:
        """Network output width: ``n_classes`` for classification, 1 for regression."""
        return self.n_classes if self.n_classes is not None else 1

    @property
    def input_columns(self) -> list[str]:
        """The raw columns ``transform`` reads."""
        return [c.name for c in self.numeric] + [c.name for c in self.categorical]

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """Raw rows to a ``[len(df), input_dim]`` float32 matrix; columns not used are ignored.

        Raises:
            ValueError: an input column is missing, or a numeric column holds non-numbers or infinities.
        """
        _require_columns(df, self.input_columns, "the input rows")
        blocks: list[np.ndarray] = []
        if self.numeric:
            values = np.column_stack([_as_float(df[c.name], c.name) for c in self.numeric])
            means = np.array([c.mean for c in self.numeric])
            values = np.where(np.isnan(values), means, values)
            blocks.append((values - np.array([c.center for c in self.numeric]))
                          / np.array([c.scale for c in self.numeric]))
        for c in self.categorical:
            codes = _codes(df[c.name].astype("string"), c.vocabulary)
            onehot = np.zeros((len(df), len(c.vocabulary) + 1))
            onehot[np.arange(len(df)), np.where(codes < 0, len(c.vocabulary), codes)] = 1.0
            blocks.append(onehot)
        if not blocks:
            return np.zeros((len(df), 0), np.float32)
        return np.hstack(blocks).astype(np.float32)

    def encode_target(self, series: pd.Series) -> np.ndarray:
        """Labels to class indices (int64) for classification, or values to float32 for regression.

        Raises:
            ValueError: a missing target, or a label that the train split did not contain.
        """
        if series.isna().any():
            raise ValueError(f"target '{self.target}' has {int(series.isna().sum())} missing value(s); "
                             "the clean step must drop rows without a target")
        if self.classes is None:
            return _as_float(series, self.target).astype(np.float32)
        labels = series.astype("string")
        codes = _codes(labels, self.classes)
        if (codes < 0).any():
            unseen = sorted(set(labels[codes < 0]))
            raise ValueError(f"target '{self.target}' has label(s) {unseen} not seen in the train split "
                             f"(known: {list(self.classes)}); drop those rows or collect more data for them")
        return codes

    def decode_target(self, indices: np.ndarray) -> np.ndarray:
        """Class indices back to label strings (classification); regression values are returned as they are.

        Raises:
            ValueError: an index outside ``0..n_classes-1``.
        """
        indices = np.asarray(indices)
        if self.classes is None:
            return indices
        if indices.size and (indices.min() < 0 or indices.max() >= len(self.classes)):
            raise ValueError(f"class index out of range 0..{len(self.classes) - 1}: "
                             f"found {int(indices.min())}..{int(indices.max())}")
        return np.asarray(self.classes, dtype=object)[indices.astype(np.int64)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; floats survive a JSON round trip exactly, so reloaded transforms are identical."""
        return {
            "format_version": FORMAT_VERSION, "task": self.task, "target": self.target, "scaling": self.scaling,
            "max_categories": self.max_categories,
            "numeric": [{"name": c.name, "mean": c.mean, "center": c.center, "scale": c.scale}
                        for c in self.numeric],
            "categorical": [{"name": c.name, "vocabulary": list(c.vocabulary)} for c in self.categorical],
            "classes": list(self.classes) if self.classes is not None else None,
            "feature_names": self.feature_names, "input_dim": self.input_dim, "n_classes": self.n_classes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureTransform:
        """Rebuild from :meth:`to_dict` output; keys it does not know (e.g. ``split``) are ignored.

        Raises:
            ValueError: a different ``format_version`` or a missing key.
        """
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"feature spec format_version {data.get('format_version')!r} is not supported "
                             f"(expected {FORMAT_VERSION}); rerun build_features")
        try:
            return cls(
                task=data["task"], target=data["target"], scaling=data["scaling"],
                max_categories=int(data["max_categories"]),
                numeric=tuple(NumericColumn(c["name"], float(c["mean"]), float(c["center"]), float(c["scale"]))
                              for c in data["numeric"]),
                categorical=tuple(CategoricalColumn(c["name"], tuple(c["vocabulary"]))
                                  for c in data["categorical"]),
                classes=tuple(data["classes"]) if data["classes"] is not None else None,
            )
        except KeyError as exc:
            raise ValueError(f"feature spec is missing the key {exc}; rerun build_features") from None

    def save(self, path: str | Path) -> Path:
        """Atomically write :meth:`to_dict` as JSON."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> FeatureTransform:
        """Read a transform saved by :meth:`save` (or a ``feature_spec.json``)."""
        return cls.from_dict(read_json(path))


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
    _require_columns(df, [config.target], str(clean_dir / CLEAN_FILE))
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


def _fit_numeric(series: pd.Series, scaling: Scaling) -> NumericColumn:
    values = _as_float(series, series.name)
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        raise ValueError(f"numeric column '{series.name}' has no values in the train split; declare it 'ignore' "
                         "or choose a cleaning policy that fills it")
    mean = float(finite.mean())
    if scaling == "standard":
        center, scale = mean, float(finite.std())
    elif scaling == "minmax":
        center, scale = float(finite.min()), float(finite.max() - finite.min())
    else:
        center, scale = 0.0, 1.0
    return NumericColumn(str(series.name), mean, center, scale if scale > 0 else 1.0)


def _fit_categorical(series: pd.Series, max_categories: int) -> CategoricalColumn:
    counts = series.dropna().astype("string").value_counts()
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))  # ties broken by value: deterministic
    return CategoricalColumn(str(series.name), tuple(str(v) for v, _ in ranked[:max_categories]))


def _codes(values: pd.Series, vocabulary: tuple[str, ...]) -> np.ndarray:
    """Index of each value in ``vocabulary`` (int64); -1 for nulls and values outside it."""
    return pd.Index(list(vocabulary), dtype=object).get_indexer(values.to_numpy(object, na_value=None)) \
        .astype(np.int64)


def _as_float(series: pd.Series, name: Any) -> np.ndarray:
    """A numeric column as float64 with NaN for missing values; non-numbers and infinities are errors."""
    try:
        values = pd.to_numeric(series).to_numpy(dtype=np.float64, na_value=np.nan)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"numeric column '{name}' holds a value that is not a number ({exc}); "
                         "fix the input or declare the column categorical") from None
    if np.isinf(values).any():
        raise ValueError(f"numeric column '{name}' holds {int(np.isinf(values).sum())} infinite value(s); "
                         "clean them (e.g. outliers: clip_iqr) or fix the source")
    return values


def _require_columns(df: pd.DataFrame, columns: list[str], where: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        present = ", ".join(map(str, df.columns[:20])) + (", ..." if len(df.columns) > 20 else "")
        raise ValueError(f"{where} lack(s) the column(s) {missing} (present: {present}); "
                         "pass rows with every column the feature spec was fitted on")
