"""The ``build_features`` step: split cleaned rows, fit a feature transform on the train split, write matrices.

Input is the ``clean`` step's folder (``clean.parquet`` and ``clean_report.json``). Output is one parquet file per
split with float32 columns ``f0..f{d-1}`` and an encoded ``target`` column, the raw test rows for serving parity
checks, and ``feature_spec.json``: the fitted :class:`~kiln.tasks.features.transform.FeatureTransform` that serving
reloads to transform a raw record exactly as training did (:mod:`kiln.tasks.features.splits` reads them back).

Each split file holds its rows in the split's shuffled order, in row groups of ``group_rows``: a training rank
reads its contiguous share of the train file from the row groups that hold it. The step holds one column or one
row group at a time, never the whole table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from kiln.tasks.features.batches import BATCH_ROWS, GROUP_ROWS
from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.spec import FeaturesSpec, PipelineSpec, TaskType
from kiln.tasks.storage.artifacts import read_json, write_json

if TYPE_CHECKING:
    from collections.abc import Callable

    import pandas as pd
    import pyarrow.parquet as pq

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildFeaturesConfig:
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
            raise ValueError("BuildFeaturesConfig.target must name the label column")
        if self.task not in get_args(TaskType):
            raise ValueError(f"BuildFeaturesConfig.task must be one of {get_args(TaskType)}, found {self.task!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"BuildFeaturesConfig.seed must be a non-negative integer, found {self.seed!r}")

    @classmethod
    def from_spec(cls, spec: PipelineSpec) -> BuildFeaturesConfig:
        """The config a pipeline spec implies (the split uses ``training.seed``)."""
        return cls(target=spec.target, task=spec.task, features=spec.features, seed=spec.training.seed)


@dataclass(frozen=True)
class BuildFeaturesResult:
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


def run_build_features(config: BuildFeaturesConfig, clean_dir: Path, out_dir: Path, *,
                       batch_rows: int = BATCH_ROWS, group_rows: int = GROUP_ROWS) -> BuildFeaturesResult:
    """Split the cleaned rows, fit the transform on train, and write the split files and ``feature_spec.json``.

    Nothing holds the whole cleaned table: the split reads the target column only, the transform is fitted one
    column at a time (that column's train rows), and the split files are written from record batches of
    ``batch_rows`` in row groups of ``group_rows`` (see :mod:`kiln.tasks.features.split_writer`). The files do not
    depend on ``batch_rows``.

    Args:
        config: the step's settings.
        clean_dir: the ``clean`` step's output folder.
        out_dir: an empty folder to write into (the caller publishes it).
        batch_rows: rows per record batch read.
        group_rows: rows per row group of the split files (the unit a training rank's shard is read in).

    Raises:
        FileNotFoundError: an input file is missing.
        ValueError: the clean report disagrees with the config, or the rows cannot be split as asked.
    """
    from kiln.tasks.features.split_writer import write_split_files
    from kiln.tasks.features.splits import SPLIT_FILES, TARGET_COLUMN, TEST_RAW_FILE, split_index
    from kiln.tasks.features.transform import FEATURE_SPEC_FILE, FeatureTransform

    clean_dir, out_dir = Path(clean_dir), Path(out_dir)
    pf, column_types = _open_clean(config, clean_dir)
    read = _column_reader(pf)
    f = config.features
    parts = split_index(read(config.target), config.task, f.test_fraction, f.val_fraction, config.seed)
    transform = FeatureTransform.fit_columns(pf.schema_arrow.names, lambda c: read(c).iloc[parts["train"]],
                                             column_types, config.target, config.task, f.scaling, f.max_categories)
    write_split_files(clean_dir / keys.CLEAN_FILE, dict(parts), {s: out_dir / SPLIT_FILES[s] for s in parts},
                      {"test": out_dir / TEST_RAW_FILE}, transform, TARGET_COLUMN, batch_rows=batch_rows,
                      group_rows=group_rows)
    sizes = {f"n_{split}": len(rows) for split, rows in parts.items()}
    write_json(out_dir / FEATURE_SPEC_FILE, {**transform.to_dict(), "split": {
        **sizes, "seed": config.seed, "test_fraction": f.test_fraction, "val_fraction": f.val_fraction}})
    log.info("build_features: %d rows in -> train %d, val %d, test %d; %d features (%d numeric, %d categorical "
             "columns)", pf.metadata.num_rows, sizes["n_train"], sizes["n_val"], sizes["n_test"],
             transform.input_dim, len(transform.numeric), len(transform.categorical))
    return BuildFeaturesResult(n_train=sizes["n_train"], n_val=sizes["n_val"], n_test=sizes["n_test"],
                               input_dim=transform.input_dim, n_classes=transform.n_classes,
                               feature_names=tuple(transform.feature_names), classes=transform.classes)


def build_features(ctx: RunContext) -> BuildFeaturesResult:
    """Split and transform the cleaned data into ``<run>/build_features``."""
    config = BuildFeaturesConfig.from_spec(ctx.spec)
    return ctx.publish(keys.BUILD_FEATURES,
                       lambda out: run_build_features(config, ctx.input_dir(keys.CLEAN), out))


def _open_clean(config: BuildFeaturesConfig, clean_dir: Path) -> tuple[pq.ParquetFile, dict[str, str]]:
    for name in (keys.CLEAN_FILE, keys.CLEAN_REPORT_FILE):
        if not (clean_dir / name).is_file():
            raise FileNotFoundError(f"{clean_dir / name} does not exist; run the clean step first")
    import pandas as pd
    import pyarrow.parquet as pq

    from kiln.tasks.features.transform import require_columns

    report = read_json(clean_dir / keys.CLEAN_REPORT_FILE)
    missing = [k for k in ("column_types", "target", "task") if k not in report]
    if missing:
        raise ValueError(f"{clean_dir / keys.CLEAN_REPORT_FILE} lacks the key(s) {missing}; rerun the clean step")
    for field in ("target", "task"):
        if report[field] != getattr(config, field):
            raise ValueError(f"{clean_dir / keys.CLEAN_REPORT_FILE} has {field} {report[field]!r} but the features "
                             f"config has {getattr(config, field)!r}; rerun clean with the current spec")
    pf = pq.ParquetFile(clean_dir / keys.CLEAN_FILE)
    require_columns(pd.DataFrame(columns=pf.schema_arrow.names), [config.target], str(clean_dir / keys.CLEAN_FILE))
    return pf, dict(report["column_types"])


def _column_reader(pf: pq.ParquetFile) -> Callable[[str], pd.Series]:
    """``read(name)``: one whole column of ``pf`` as pandas, with the dtype a whole-file read gives it."""
    from kiln.tasks.features.batches import file_dtypes, to_frame

    dtypes = file_dtypes(pf)
    return lambda name: to_frame(pf.read(columns=[name], use_pandas_metadata=False), dtypes)[name]
