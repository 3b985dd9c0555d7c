"""The fitted feature transform: raw columns in, float32 matrix out, identically in training and serving.

Kept apart from the ``build_features`` step so that a serving process can load ``feature_spec.json`` and
transform raw records without importing the splitting code (scikit-learn).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import pandas as pd

from kiln.tasks.storage.artifacts import read_json, write_json

if TYPE_CHECKING:
    from kiln.tasks.spec import TaskType

Scaling = Literal["standard", "minmax", "none"]
#: The file a fitted transform is saved to (by ``build_features``, and inside every model bundle).
FEATURE_SPEC_FILE = "feature_spec.json"
#: Version of the ``FeatureTransform.to_dict`` layout; ``from_dict`` refuses other versions.
FORMAT_VERSION = 1
UNKNOWN = "__unknown__"
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
        return cls.fit_columns(list(df.columns), df.__getitem__, column_types, target, task, scaling,
                               max_categories)

    @classmethod
    def fit_columns(cls, columns: list[str], read_column: Callable[[str], pd.Series], column_types: dict[str, str],
                    target: str, task: TaskType, scaling: Scaling, max_categories: int) -> FeatureTransform:
        """Fit on train rows read one column at a time (``read_column(name)``: that column's train rows, in
        split order); the columns other than the one being fitted need not be in memory. Arguments and errors
        as in :meth:`fit`; ``columns`` are the train split's columns in source order."""
        if scaling not in get_args(Scaling):
            raise ValueError(f"scaling must be one of {get_args(Scaling)}, found {scaling!r}")
        declared = [target, *(c for c, k in column_types.items() if k != "ignore")]
        require_columns(pd.DataFrame(columns=columns), declared, "the train split")
        numeric, categorical = [], []
        for col in columns:  # source order, not the report's order
            kind = column_types.get(col)
            if col == target or kind in (None, "ignore"):
                continue
            if kind == "numeric":
                numeric.append(_fit_numeric(read_column(col), scaling))
            elif kind == "categorical":
                categorical.append(_fit_categorical(read_column(col), max_categories))
            else:
                raise ValueError(f"column '{col}' has type {kind!r}; allowed: numeric, categorical, ignore")
        classes = None
        if task == "classification":
            classes = tuple(sorted(read_column(target).dropna().astype("string").unique()))
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
        require_columns(df, self.input_columns, "the input rows")
        n, width = len(df), len(self.numeric)
        # Written straight into the float32 result: a float64 value rounds to float32 the same way either way,
        # and an intermediate float64 matrix of one-hot blocks took most of the time and memory.
        out = np.zeros((n, self.input_dim), np.float32)
        if self.numeric:
            values = np.column_stack([_as_float(df[c.name], c.name) for c in self.numeric])
            means = np.array([c.mean for c in self.numeric])
            values = np.where(np.isnan(values), means, values)
            out[:, :width] = ((values - np.array([c.center for c in self.numeric]))
                              / np.array([c.scale for c in self.numeric]))
        rows, start = np.arange(n), width
        for c in self.categorical:
            codes = _codes(df[c.name], c.vocabulary)
            out[rows, start + np.where(codes < 0, len(c.vocabulary), codes)] = 1.0
            start += len(c.vocabulary) + 1
        return out

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
    """Index of each value in ``vocabulary`` (int64); -1 for nulls and values outside it. A value that is not text
    is looked up as ``astype("string")`` writes it (``2007``, ``2007.0``, ``True``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not isinstance(values.dtype, pd.StringDtype):
        values = values.astype("string")
    # Looked up in Arrow, where text columns already live: a round trip through Python str objects took most of
    # a batch's transform time.
    found = pc.index_in(pa.array(values), value_set=pa.array(vocabulary, pa.string()))
    return found.fill_null(-1).to_numpy().astype(np.int64)


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


def require_columns(df: pd.DataFrame, columns: list[str], where: str) -> None:
    """Raise a ValueError naming the missing columns of ``df`` (``where`` says which frame) and the fix."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        present = ", ".join(map(str, df.columns[:20])) + (", ..." if len(df.columns) > 20 else "")
        raise ValueError(f"{where} lack(s) the column(s) {missing} (present: {present}); "
                         "pass rows with every column the feature spec was fitted on")
