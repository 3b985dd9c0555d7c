"""The model bundle: the self-contained, servable form of a trained model.

A bundle is a folder that a model server loads without the training code: the network as TorchScript (its output
is exactly what :func:`kiln.tasks.training.networks.predict` gives: softmax probabilities or regression values), the fitted
feature transform, a signature of inputs and outputs, sample raw rows with the predictions training made for
them (for parity checks before and after deployment), and a manifest with versions and provenance::

    bundle.json               format_version, created_at, torch version, model meta, provenance, file hashes
    model.ts                  TorchScript module: float32 features [n, d] -> probabilities [n, k] or values [n]
    feature_spec.json         the FeatureTransform (as written by build_features)
    signature.json            inputs (name, numeric|categorical, nullable) and outputs (task, classes)
    sample.parquet            raw sample rows (input columns only) from the test split
    sample_predictions.npy    training-side predictions of those rows

:func:`export_bundle` writes one and checks it by loading it back; :func:`load_bundle` reads one, refusing a
folder that is incomplete, altered or of another format version (:class:`BundleError`).
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from kiln.tasks.features.records import RecordError, RecordTransform, records_from_frame
from kiln.tasks.features.transform import FeatureTransform
from kiln.tasks.steps.build_features import FEATURE_SPEC_FILE, TEST_RAW_FILE
from kiln.tasks.storage.artifacts import atomic_write_bytes, file_sha256, read_json, write_json

__all__ = ["BUNDLE_FORMAT_VERSION", "MANIFEST_FILE", "MODEL_FILE", "SAMPLE_FILE", "SAMPLE_PREDICTIONS_FILE",
           "SIGNATURE_FILE", "Bundle", "BundleError", "ExportConfig", "ExportResult", "RecordError", "export_bundle",
           "load_bundle", "records_from_frame"]

log = logging.getLogger(__name__)

#: Version of the bundle layout; :func:`load_bundle` refuses other versions.
BUNDLE_FORMAT_VERSION = 1
MODEL_FILE = "model.ts"
SIGNATURE_FILE = "signature.json"
SAMPLE_FILE = "sample.parquet"
SAMPLE_PREDICTIONS_FILE = "sample_predictions.npy"
MANIFEST_FILE = "bundle.json"
#: Every file of a bundle but the manifest, which lists their sha256.
CONTENT_FILES = (MODEL_FILE, FEATURE_SPEC_FILE, SIGNATURE_FILE, SAMPLE_FILE, SAMPLE_PREDICTIONS_FILE)
#: Largest difference allowed between the exported module's predictions and training's on the sample.
EXPORT_TOLERANCE = 1e-5
_REEXPORT = "re-export it with kiln.tasks.bundle.load.export_bundle (the register step)"


class BundleError(ValueError):
    """A bundle that cannot be written or loaded: unreadable, incomplete, altered or of another format."""


@dataclass(frozen=True)
class ExportConfig:
    """Settings of :func:`export_bundle`."""

    features_dir: Path
    """The ``build_features`` output folder (``feature_spec.json``, ``test_raw.parquet``)."""
    model_dir: Path
    """The ``train`` output folder (``model.pt``)."""
    sample_rows: int = 64
    """Raw test rows kept as the bundle's sample (fewer if the test split is smaller); at least 1."""
    metadata: dict[str, str] = field(default_factory=dict)
    """Provenance copied into ``bundle.json`` (e.g. pipeline, run_key, mlflow_run_id, spec_hash, data_hash,
    code_version)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "features_dir", Path(self.features_dir))
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        if isinstance(self.sample_rows, bool) or not isinstance(self.sample_rows, int) or self.sample_rows < 1:
            raise ValueError(f"ExportConfig.sample_rows must be an integer >= 1, found {self.sample_rows!r}")
        if not isinstance(self.metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise ValueError(f"ExportConfig.metadata must map strings to strings, found {self.metadata!r}; "
                             "convert values with str() first")


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_bundle` wrote."""

    bundle_dir: Path
    manifest: dict[str, Any]
    """The content of ``bundle.json``."""
    sample_rows: int
    """Rows in ``sample.parquet``."""
    max_abs_diff: float
    """Largest difference between the bundle's and training's predictions on the sample."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (e.g. for XCom)."""
        return {"bundle_dir": str(self.bundle_dir), "manifest": self.manifest, "sample_rows": self.sample_rows,
                "max_abs_diff": self.max_abs_diff}


class _Servable(nn.Module):
    """The network plus the output head of :func:`kiln.tasks.training.networks.predict`, so the bundle needs no training code."""

    def __init__(self, network: nn.Module, classification: bool):
        super().__init__()
        self.network = network
        self.classification = classification

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        if self.classification:
            return torch.softmax(out, dim=1)
        return out.squeeze(1)


class Bundle:
    """A loaded bundle: transform records, predict, format answers. Safe to share between threads.

    Attributes:
        path: the bundle folder.
        manifest: the content of ``bundle.json``.
        transform: the fitted feature transform.
        signature: the content of ``signature.json``.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], transform: FeatureTransform, signature: dict[str, Any],
                 module: torch.jit.ScriptModule, sample: pd.DataFrame, sample_predictions: np.ndarray):
        self.path = path
        self.manifest = manifest
        self.transform = transform
        self.signature = signature
        self._module = module
        self._records = RecordTransform(transform)
        self._sample = sample
        self._sample_predictions = sample_predictions
        self._classes = transform.classes

    @property
    def task(self) -> str:
        """``classification`` or ``regression``."""
        return self.transform.task

    @property
    def classes(self) -> tuple[str, ...] | None:
        """Class labels in output order (classification); ``None`` for regression."""
        return self._classes

    @property
    def input_columns(self) -> list[str]:
        """The raw columns every record must hold."""
        return self.transform.input_columns

    def transform_records(self, records: Any) -> np.ndarray:
        """Validate a request's records and transform them to the float32 feature matrix.

        See :class:`kiln.tasks.features.records.RecordTransform` for the accepted values.

        Args:
            records: the parsed JSON body's ``records`` value: a non-empty list of objects.

        Returns:
            ``[len(records), input_dim]`` float32, identical to what training's transform gives.

        Raises:
            RecordError: one entry per bad field (``records[i].column``), record or a bad ``records`` value.
        """
        return self._records(records)

    def predict_features(self, x: np.ndarray) -> np.ndarray:
        """Run the network on a feature matrix.

        Args:
            x: ``[n, input_dim]`` features (cast to float32); ``n`` may be 0.

        Returns:
            float32 ``[n, n_classes]`` probabilities (classification) or ``[n]`` values (regression).

        Raises:
            ValueError: ``x`` is not a matrix of ``input_dim`` columns.
        """
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.transform.input_dim:
            raise ValueError(f"features must have shape [n, {self.transform.input_dim}], found {list(x.shape)}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not x.flags.writeable:  # torch.from_numpy warns on read-only memory (e.g. np.frombuffer)
            x = x.copy()
        with torch.inference_mode():
            out = self._module(torch.from_numpy(x))
        return out.numpy()

    def predict_frame(self, df: pd.DataFrame) -> np.ndarray:
        """Predict raw rows given as a DataFrame (the training-side transform, then :meth:`predict_features`).

        Raises:
            ValueError: an input column is missing or a numeric column holds non-numbers.
        """
        return self.predict_features(self.transform.transform(df))

    def predict_records(self, records: Any) -> np.ndarray:
        """Predict raw JSON records (:meth:`transform_records`, then :meth:`predict_features`).

        Raises:
            RecordError: see :meth:`transform_records`.
        """
        return self.predict_features(self._records(records))

    def format_predictions(self, y: np.ndarray) -> list[dict[str, Any]]:
        """Predictions as JSON-ready answers, one per row.

        Args:
            y: the output of :meth:`predict_features`.

        Returns:
            ``{"label": "Adelie", "probabilities": {"Adelie": 0.97, ...}}`` per row (classification; the label
            is the most probable class, the first one on ties) or ``{"value": 3.2}`` (regression).

        Raises:
            ValueError: ``y`` does not have the shape this bundle's model produces.
        """
        y = np.asarray(y)
        if self._classes is None:
            if y.ndim != 1:
                raise ValueError(f"regression predictions must have shape [n], found {list(y.shape)}")
            return [{"value": v} for v in y.tolist()]
        if y.ndim != 2 or y.shape[1] != len(self._classes):
            raise ValueError(f"classification predictions must have shape [n, {len(self._classes)}], "
                             f"found {list(y.shape)}")
        classes = self._classes
        return [{"label": classes[i], "probabilities": dict(zip(classes, row, strict=True))}
                for i, row in zip(y.argmax(axis=1).tolist(), y.tolist(), strict=True)]

    def sample(self) -> tuple[pd.DataFrame, np.ndarray]:
        """The bundle's raw sample rows (input columns only) and training's predictions of them (copies)."""
        return self._sample.copy(), self._sample_predictions.copy()

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, task={self.task!r}, inputs={len(self.input_columns)})"


def export_bundle(config: ExportConfig, out_dir: Path) -> ExportResult:
    """Write the bundle of a trained model into ``out_dir`` and check it by loading it back.

    Args:
        config: where the features and the model are, sample size and provenance.
        out_dir: the folder to write into (created if needed; the caller publishes it).

    Returns:
        The manifest and the largest prediction difference found by the self-check.

    Raises:
        FileNotFoundError: ``feature_spec.json``, ``test_raw.parquet`` or ``model.pt`` is missing.
        BundleError: the model does not fit the features, the test split is empty, the model predicts
            non-finite values, or the exported module's predictions on the sample differ from training's by
            more than :data:`EXPORT_TOLERANCE`.
    """
    from kiln.tasks.training.networks import (
        MODEL_FILE as TRAINED_MODEL_FILE,  # training code: needed to export, never to load
    )
    from kiln.tasks.training.networks import load_model, predict

    out_dir = Path(out_dir)
    spec_path, raw_path = config.features_dir / FEATURE_SPEC_FILE, config.features_dir / TEST_RAW_FILE
    for path in (spec_path, raw_path, config.model_dir / TRAINED_MODEL_FILE):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; run build_features and train before exporting")
    transform = FeatureTransform.load(spec_path)
    model = load_model(config.model_dir)
    _check_model_fits(model.meta, transform)
    sample = pd.read_parquet(raw_path, columns=transform.input_columns).head(config.sample_rows)
    if sample.empty:
        raise BundleError(f"{raw_path} has 0 rows: the bundle needs sample rows for its parity check; "
                          "give the test split at least one row (features.test_fraction)")
    sample = sample.reset_index(drop=True)
    expected = predict(model, transform.transform(sample))
    if not np.isfinite(expected).all():
        raise BundleError(f"the model in {config.model_dir} predicts non-finite values for the sample rows of "
                          f"{raw_path}; training diverged: lower the learning rate or check the features")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / MODEL_FILE, _script_bytes(model.module, transform.task))
    atomic_write_bytes(out_dir / FEATURE_SPEC_FILE, spec_path.read_bytes())
    manifest = _write_rest(out_dir, transform, sample, expected, {"model": model.meta, "metadata": config.metadata})
    max_abs_diff = _self_check(out_dir, sample, expected)
    log.info("export_bundle: %s model (%d inputs -> %d features) exported to %s; %d sample rows, max abs diff "
             "%.3g", transform.task, len(transform.input_columns), transform.input_dim, out_dir, len(sample),
             max_abs_diff)
    return ExportResult(bundle_dir=out_dir, manifest=manifest, sample_rows=len(sample), max_abs_diff=max_abs_diff)


def load_bundle(path: str | Path) -> Bundle:
    """Load a bundle folder written by :func:`export_bundle`.

    Args:
        path: the bundle folder.

    Returns:
        The loaded bundle (TorchScript module on CPU, in eval mode).

    Raises:
        BundleError: the folder or a file is missing, a file does not match its hash in ``bundle.json``, the
            format version is not :data:`BUNDLE_FORMAT_VERSION`, or a file cannot be read; the message names
            the file and the fix.
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle folder {path} does not exist; check the path or {_REEXPORT}")
    manifest = _read_manifest(path)
    try:
        transform = FeatureTransform.load(path / FEATURE_SPEC_FILE)
        signature = read_json(path / SIGNATURE_FILE)
        sample = pd.read_parquet(path / SAMPLE_FILE)
        sample_predictions = np.load(path / SAMPLE_PREDICTIONS_FILE, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BundleError(f"bundle {path} has an unreadable file ({exc}); {_REEXPORT}") from None
    outputs = (len(sample),) if transform.classes is None else (len(sample), len(transform.classes))
    if sample_predictions.shape != outputs or list(sample.columns) != transform.input_columns \
            or signature != _signature(transform):
        raise BundleError(f"bundle {path}: {SIGNATURE_FILE}, {SAMPLE_FILE} or {SAMPLE_PREDICTIONS_FILE} do not "
                          f"fit {FEATURE_SPEC_FILE}; {_REEXPORT}")
    try:
        with _torchscript_without_deprecation_warnings():
            module = torch.jit.load(str(path / MODEL_FILE), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as exc:
        raise BundleError(f"bundle file {path / MODEL_FILE} cannot be loaded as TorchScript by torch "
                          f"{torch.__version__} (exported with torch {manifest.get('torch_version')}): {exc}; "
                          f"{_REEXPORT}") from None
    return Bundle(path, manifest, transform, signature, module.eval(), sample, sample_predictions)


def _write_rest(out_dir: Path, transform: FeatureTransform, sample: pd.DataFrame, expected: np.ndarray,
                provenance: dict[str, Any]) -> dict[str, Any]:
    """Write the signature, the sample and, last, the manifest (with every file's hash); the manifest."""
    write_json(out_dir / SIGNATURE_FILE, _signature(transform))
    buf = io.BytesIO()
    sample.to_parquet(buf, index=False)
    atomic_write_bytes(out_dir / SAMPLE_FILE, buf.getvalue())
    buf = io.BytesIO()
    np.save(buf, expected, allow_pickle=False)
    atomic_write_bytes(out_dir / SAMPLE_PREDICTIONS_FILE, buf.getvalue())
    write_json(out_dir / MANIFEST_FILE, {
        "format_version": BUNDLE_FORMAT_VERSION, "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__, "task": transform.task, "model": provenance["model"],
        "metadata": dict(provenance["metadata"]), "sample_rows": len(sample),
        "files": {name: file_sha256(out_dir / name) for name in CONTENT_FILES},
    })
    return read_json(out_dir / MANIFEST_FILE)  # as readers see it (e.g. paths in the model meta as strings)


def _read_manifest(path: Path) -> dict[str, Any]:
    """``bundle.json``, checked: this format version, and every listed file present with its hash."""
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise BundleError(f"bundle {path} lacks {MANIFEST_FILE}; the folder is not a bundle or its export did not "
                          f"finish: {_REEXPORT}")
    try:
        manifest = read_json(file)
    except ValueError as exc:
        raise BundleError(f"bundle file {file} is not valid JSON ({exc}); {_REEXPORT}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"bundle file {file} must hold a JSON object; {_REEXPORT}")
    version = manifest.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        raise BundleError(f"bundle file {file} has format_version {version!r}; this code reads version "
                          f"{BUNDLE_FORMAT_VERSION}: {_REEXPORT}, or serve it with a matching kiln version")
    if not isinstance(manifest.get("files"), dict):
        raise BundleError(f"bundle file {file} lacks the 'files' hashes; {_REEXPORT}")
    for name in CONTENT_FILES:
        if not (path / name).is_file():
            raise BundleError(f"bundle {path} lacks {name}; the folder is incomplete: {_REEXPORT}")
        if manifest["files"].get(name) != file_sha256(path / name):
            raise BundleError(f"bundle file {path / name} does not match its sha256 in {MANIFEST_FILE} (altered or "
                              f"partly copied); copy the bundle again or {_REEXPORT}")
    return manifest


def _check_model_fits(meta: dict[str, Any], transform: FeatureTransform) -> None:
    """The trained network must take the transform's features and give its outputs."""
    found = (meta.get("task"), meta.get("input_dim"), meta.get("n_outputs"))
    wanted = (transform.task, transform.input_dim, transform.n_outputs)
    if found != wanted:
        raise BundleError(f"model.pt (task, input_dim, n_outputs) = {found} does not fit the feature spec's "
                          f"{wanted}; export the model trained on these features")


def _script_bytes(network: nn.Module, task: str) -> bytes:
    """The network and its output head as serialized TorchScript."""
    buf = io.BytesIO()
    with _torchscript_without_deprecation_warnings():
        torch.jit.save(torch.jit.script(_Servable(network, task == "classification").eval()), buf)
    return buf.getvalue()


@contextmanager
def _torchscript_without_deprecation_warnings() -> Iterator[None]:
    """Silence torch's notice that TorchScript is deprecated (torch >= 2.10), and only that notice.

    TorchScript is still the bundle format: it loads without the Python classes and runs every network here
    exactly; without this, a process that turns warnings into errors could not load a bundle.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        yield


def _signature(transform: FeatureTransform) -> dict[str, Any]:
    """Inputs and outputs of the bundle; every input accepts null (imputed or the unknown category)."""
    inputs = [{"name": c.name, "type": "numeric", "nullable": True} for c in transform.numeric] + \
        [{"name": c.name, "type": "categorical", "nullable": True} for c in transform.categorical]
    return {"inputs": inputs, "outputs": {"task": transform.task,
                                          "classes": list(transform.classes) if transform.classes else None}}


def _self_check(out_dir: Path, sample: pd.DataFrame, expected: np.ndarray) -> float:
    """Load the written bundle and replay the sample through both serving paths; the largest difference."""
    bundle = load_bundle(out_dir)
    max_abs_diff = 0.0
    for path, got in (("frame", bundle.predict_frame(sample)),
                      ("records", bundle.predict_records(records_from_frame(sample)))):
        diff = float(np.max(np.abs(got.astype(np.float64) - expected))) if got.shape == expected.shape \
            else math.inf
        if not diff <= EXPORT_TOLERANCE:  # also catches NaN
            raise BundleError(f"the exported bundle in {out_dir} predicts the sample ({path} path) with max abs "
                              f"diff {diff:.3g} from training's predictions (allowed {EXPORT_TOLERANCE:g}); the "
                              "network does not export faithfully: check the model type and torch version")
        max_abs_diff = max(max_abs_diff, diff)
    return max_abs_diff
