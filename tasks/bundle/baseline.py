"""The training baseline of a bundle: what the model's inputs, answers and test scores looked like when it was made.

Monitoring compares live traffic with it. ``register`` writes two files into the bundle, and
:func:`kiln.tasks.bundle.export.export_bundle` lists both in ``bundle.json``'s ``files`` hashes::

    baseline.json             {"format": 1, "profile", "predictions", "metrics", "sample_rows", "created_at"}
    baseline_sample.parquet   a seeded sample of at most 5,000 raw training rows, input columns only

* ``profile``: :meth:`kiln.tasks.features.profile.DataProfile.to_dict` of the raw training rows restricted to the
  bundle's input columns: per column the missing count, quantiles (numeric) or category counts (categorical).
  The rows are the run's ingest snapshot, as the source had them (before ``clean`` imputes or clips), because a
  client sends raw values too; the snapshot holds the train, validation and test rows alike (one distribution).
* ``predictions``: the model's answers on the test split (``evaluate``'s predictions):
  ``{"kind": "classes", "shares": {class: share}}`` (every class, in output order) or
  ``{"kind": "numeric", "quantiles": [q0, q10, ..., q100], "mean": m}``.
* ``metrics``: ``{"primary": name, "value": v, "all": {name: v}}``, the test split's figures (plain names).

The profile's quantiles are its own levels (0, 0.01, 0.05, 0.1, 0.25, 0.5, ..., 1), not deciles: deciles come from
the sample. A categorical input that the source stores as numbers (an integer ``year``) is profiled as numeric: its
categories are in the sample. The sample keeps the snapshot's column types; its rows are in snapshot order.
Bundles from before the baseline have neither file: :func:`load_baseline` returns ``None`` for them. Nothing here
imports torch, pandas or pyarrow at module level, nor :mod:`kiln.tasks.bundle.load` (torch): a monitor reads a
baseline without loading the model.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.tasks.bundle.files import BASELINE_FILE, BASELINE_FILES, BASELINE_SAMPLE_FILE, MANIFEST_FILE
from kiln.tasks.storage.artifacts import atomic_write_bytes, file_sha256, read_json, write_json

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy as np
    import pandas as pd

    from kiln.tasks.features.profile import DataProfile

log = logging.getLogger(__name__)

#: Version of ``baseline.json`` that :func:`write_baseline` writes and :func:`load_baseline` reads.
BASELINE_FORMAT = 1
#: Most raw rows kept in ``baseline_sample.parquet`` (enough for a two-sample KS test to see a small shift).
MAX_SAMPLE_ROWS = 5_000
#: The quantiles of regression predictions: deciles, from the minimum to the maximum.
PREDICTION_QUANTILES = tuple(i / 10 for i in range(11))
_BATCH_ROWS = 65_536
_REEXPORT = "re-export the bundle (the register step)"


class BaselineError(ValueError):
    """A baseline that cannot be written or read: inputs that do not fit, or files missing, altered or too new."""


@dataclass(frozen=True)
class BaselineConfig:
    """What :func:`write_baseline` summarises."""

    rows_path: Path
    """The raw training rows (the run's ingest snapshot, a Parquet file holding at least the input columns)."""
    predictions_path: Path
    """The model's predictions on the test split (``evaluate``'s ``.npy``): probabilities ``[n, k]`` or values
    ``[n]``."""
    metrics: dict[str, float]
    """The test split's metrics by plain name (``accuracy``, not ``test/accuracy``)."""
    primary_metric: str
    """The gate's metric (a key of ``metrics``)."""
    seed: int
    """Seed of the sample (the training seed: the same rows give the same sample)."""
    profile: DataProfile | None = None
    """A profile of ``rows_path`` already made (``validate``'s), reused; ``None``: the rows are profiled here."""
    sample_rows: int = MAX_SAMPLE_ROWS
    """Most rows in the sample."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "rows_path", Path(self.rows_path))
        object.__setattr__(self, "predictions_path", Path(self.predictions_path))
        if self.primary_metric not in self.metrics:
            raise BaselineError(f"BaselineConfig.primary_metric {self.primary_metric!r} is not among the test "
                                f"metrics {sorted(self.metrics)}; evaluate with the spec's primary metric")
        for name, value in (("sample_rows", self.sample_rows), ("seed", self.seed)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "sample_rows" else 0):
                raise BaselineError(f"BaselineConfig.{name} must be an integer >= "
                                    f"{1 if name == 'sample_rows' else 0}, found {value!r}")


@dataclass(frozen=True)
class Baseline:
    """A bundle's baseline, as :func:`load_baseline` reads it."""

    profile: DataProfile
    """The raw training rows' profile, input columns only."""
    predictions: dict[str, Any]
    """``{"kind": "classes", "shares"}`` or ``{"kind": "numeric", "quantiles", "mean"}`` (module docstring)."""
    metrics: dict[str, Any]
    """``{"primary": name, "value": v, "all": {name: v}}``: the test split's figures."""
    sample_path: Path
    """``baseline_sample.parquet`` (raw rows, input columns only)."""
    sample_rows: int
    created_at: str

    def sample(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The sample rows (``columns`` only, if given)."""
        import pandas as pd

        return pd.read_parquet(self.sample_path, columns=list(columns) if columns is not None else None)


def write_baseline(config: BaselineConfig, out_dir: Path, input_columns: Sequence[str],
                   classes: Sequence[str] | None) -> dict[str, Any]:
    """Write ``baseline.json`` and ``baseline_sample.parquet`` into ``out_dir`` (a bundle being exported).

    Args:
        config: the rows, predictions and metrics to summarise.
        out_dir: the bundle folder.
        input_columns: the bundle's raw input columns (the profile and the sample keep these only).
        classes: the class labels in output order (classification), ``None`` for regression.

    Returns:
        The content of ``baseline.json``.

    Raises:
        FileNotFoundError: the rows or the predictions file is missing.
        BaselineError: the rows lack an input column, the given profile is not of these rows, or the predictions
            do not fit the classes or are not finite.
    """
    import numpy as np

    started = datetime.now(UTC)
    for path in (config.rows_path, config.predictions_path):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} does not exist; run ingest and evaluate before writing the baseline")
    predictions = prediction_summary(np.load(config.predictions_path, allow_pickle=False), classes,
                                     str(config.predictions_path))
    rows = _write_sample(config, Path(out_dir) / BASELINE_SAMPLE_FILE, list(input_columns))
    profile = _input_profile(config, list(input_columns))
    content = {"format": BASELINE_FORMAT, "profile": profile.to_dict(), "predictions": predictions,
               "metrics": {"primary": config.primary_metric, "value": config.metrics[config.primary_metric],
                           "all": dict(config.metrics)},
               "sample_rows": rows, "created_at": started.isoformat(timespec="seconds")}
    write_json(Path(out_dir) / BASELINE_FILE, content)
    log.info("baseline: %d input columns profiled over %d rows, %d sample rows, %s %s, in %.2f s", len(input_columns),
             profile.rows, rows, config.primary_metric, config.metrics[config.primary_metric],
             (datetime.now(UTC) - started).total_seconds())
    return content


def prediction_summary(predictions: np.ndarray, classes: Sequence[str] | None, source: str = "predictions"
                       ) -> dict[str, Any]:
    """The distribution of a model's answers: class shares (classification) or deciles and mean (regression).

    Args:
        predictions: probabilities ``[n, len(classes)]`` or values ``[n]``, ``n >= 1``.
        classes: the class labels in output order, ``None`` for regression.
        source: what the predictions are, for messages.

    Returns:
        ``{"kind": "classes", "shares": {class: share}}`` (the most probable class per row, every class listed) or
        ``{"kind": "numeric", "quantiles": [...11 values], "mean": m}``.

    Raises:
        BaselineError: the shape does not fit, there are no rows, or a value is NaN or infinite.
    """
    import numpy as np

    y = np.asarray(predictions)
    want = "[n]" if classes is None else f"[n, {len(classes)}]"
    if y.ndim != (1 if classes is None else 2) or (classes is not None and y.shape[1] != len(classes)) \
            or len(y) == 0:
        raise BaselineError(f"{source} has shape {list(y.shape)}, expected {want} with n >= 1; rerun evaluate with "
                            "this model")
    if not np.isfinite(y).all():
        raise BaselineError(f"{source} holds NaN or infinite values: the model diverged; retrain it")
    if classes is None:
        return {"kind": "numeric", "quantiles": np.quantile(y, PREDICTION_QUANTILES).tolist(), "mean": float(y.mean())}
    counts = np.bincount(y.argmax(axis=1), minlength=len(classes))
    return {"kind": "classes", "shares": {c: int(k) / len(y) for c, k in zip(classes, counts.tolist(), strict=True)}}


def _write_sample(config: BaselineConfig, target: Path, columns: list[str]) -> int:
    """A seeded sample of ``config.sample_rows`` rows (all if fewer), ``columns`` only, read a batch at a time."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetFile(config.rows_path, pre_buffer=False) as pf:
        if missing := [c for c in columns if c not in pf.schema_arrow.names]:
            raise BaselineError(f"{config.rows_path} lacks the input column(s) {missing}: the baseline's rows must "
                                "be the rows the model was trained from")
        n = pf.metadata.num_rows
        take = np.sort(np.random.default_rng(config.seed).choice(n, size=min(n, config.sample_rows), replace=False))
        parts, start = [], 0
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
            lo, hi = np.searchsorted(take, [start, start + batch.num_rows])
            if hi > lo:
                parts.append(batch.take(pa.array(take[lo:hi] - start)))
            start += batch.num_rows
        table = pa.Table.from_batches(parts) if parts else pf.schema_arrow.empty_table()
    # The schema's pandas metadata stays (column dtypes); pandas ignores the index column it names, not kept here.
    table = table.select(columns)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(target, buf.getvalue())
    return table.num_rows


def _input_profile(config: BaselineConfig, columns: list[str]) -> DataProfile:
    """The profile of the rows, input columns only, without counts against another profile."""
    from kiln.tasks.features.profile import DataProfile, profile_parquet

    profile = config.profile if config.profile is not None else profile_parquet(config.rows_path)
    rows, missing = _parquet_rows(config.rows_path), [c for c in columns if c not in profile.columns]
    if profile.rows != rows or missing:
        raise BaselineError(f"the given profile ({profile.rows} rows, lacking input columns {missing}) is not the "
                            f"profile of {config.rows_path} ({rows} rows)")
    kept = {c: replace(profile.columns[c], out_of_range=None, new_categories=None) for c in columns}
    return DataProfile(rows=profile.rows, columns=kept, sample_fraction=profile.sample_fraction)


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def load_baseline(bundle_dir: str | Path) -> Baseline | None:
    """Read the baseline of a bundle, checked against ``bundle.json``'s hashes.

    Args:
        bundle_dir: the bundle folder.

    Returns:
        The baseline, or ``None`` for a bundle exported without one (before baselines existed).

    Raises:
        BaselineError: one of the two files is missing while ``bundle.json`` lists it, a file is not listed in
            ``bundle.json`` (added after the export) or does not match its hash, or ``baseline.json`` is not a
            baseline this code reads.
    """
    from kiln.tasks.features.profile import DataProfile

    path = Path(bundle_dir)
    manifest = _read(path / MANIFEST_FILE) if (path / MANIFEST_FILE).is_file() else {}
    files = manifest.get("files")
    listed: dict[str, Any] = files if isinstance(files, dict) else {}
    if not (path / BASELINE_FILE).exists() and not any(name in listed for name in BASELINE_FILES):
        return None
    for name in BASELINE_FILES:
        if not (path / name).is_file():
            raise BaselineError(f"bundle {path} lacks {name}, which {MANIFEST_FILE} lists; copy the bundle again "
                                f"or {_REEXPORT}")
        if name not in listed:
            raise BaselineError(f"bundle {path} holds {name}, which {MANIFEST_FILE} does not list (added after the "
                                f"export); {_REEXPORT}")
        if listed[name] != file_sha256(path / name):
            raise BaselineError(f"bundle file {path / name} does not match its sha256 in {MANIFEST_FILE} (altered "
                                f"or partly copied); copy the bundle again or {_REEXPORT}")
    content = _read(path / BASELINE_FILE)
    if not isinstance(content, dict) or content.get("format") != BASELINE_FORMAT:
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise BaselineError(f"bundle file {path / BASELINE_FILE} has format {found!r}; this code reads format "
                            f"{BASELINE_FORMAT}: {_REEXPORT}, or read it with a matching kiln version")
    try:
        return Baseline(profile=DataProfile.from_dict(content["profile"]), predictions=content["predictions"],
                        metrics=content["metrics"], sample_path=path / BASELINE_SAMPLE_FILE,
                        sample_rows=int(content["sample_rows"]), created_at=str(content["created_at"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise BaselineError(f"bundle file {path / BASELINE_FILE} is not a complete baseline ({exc!r}); "
                            f"{_REEXPORT}") from None


def _read(file: Path) -> Any:
    try:
        return read_json(file)
    except ValueError as exc:
        raise BaselineError(f"bundle file {file} is not valid JSON ({exc}); {_REEXPORT}") from None
