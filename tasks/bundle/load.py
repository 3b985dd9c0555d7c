"""The model bundle: the self-contained, servable form of a trained model.

A bundle is a folder that a model server loads without the training code: the network as TorchScript (its output
is exactly what :func:`kiln.tasks.training.networks.predict` gives: softmax probabilities or regression values),
the fitted feature transform, a signature of inputs and outputs, sample raw rows with the predictions training made for
them (for parity checks before and after deployment), and a manifest with versions and provenance::

    bundle.json               format_version, created_at, torch version, model meta, provenance, file hashes
    model.ts                  TorchScript module: float32 features [n, d] -> probabilities [n, k] or values [n]
    feature_spec.json         the FeatureTransform (as written by build_features)
    signature.json            inputs (name, numeric|categorical, nullable) and outputs (task, classes)
    sample.parquet            raw sample rows (input columns only) from the test split
    sample_predictions.npy    training-side predictions of those rows

:func:`kiln.tasks.bundle.export.export_bundle` writes one and checks it by loading it back; :func:`load_bundle` reads
one, refusing a folder that is incomplete, altered or of another format version (:class:`BundleError`). A model
server imports this module only: loading needs neither the training code nor the pipeline's spec.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from kiln.tasks.features.records import RecordError, RecordTransform, records_from_frame
from kiln.tasks.features.transform import FEATURE_SPEC_FILE, FeatureTransform
from kiln.tasks.storage.artifacts import file_sha256, read_json

__all__ = ["BUNDLE_FORMAT_VERSION", "MANIFEST_FILE", "MODEL_FILE", "SAMPLE_FILE", "SAMPLE_PREDICTIONS_FILE",
           "SIGNATURE_FILE", "Bundle", "BundleError", "RecordError", "load_bundle", "records_from_frame"]

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
_REEXPORT = "re-export it with kiln.tasks.bundle.export.export_bundle (the register step)"


class BundleError(ValueError):
    """A bundle that cannot be written or loaded: unreadable, incomplete, altered or of another format."""


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
            or signature != signature_of(transform):
        raise BundleError(f"bundle {path}: {SIGNATURE_FILE}, {SAMPLE_FILE} or {SAMPLE_PREDICTIONS_FILE} do not "
                          f"fit {FEATURE_SPEC_FILE}; {_REEXPORT}")
    try:
        with quiet_torchscript():
            module = torch.jit.load(str(path / MODEL_FILE), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as exc:
        raise BundleError(f"bundle file {path / MODEL_FILE} cannot be loaded as TorchScript by torch "
                          f"{torch.__version__} (exported with torch {manifest.get('torch_version')}): {exc}; "
                          f"{_REEXPORT}") from None
    return Bundle(path, manifest, transform, signature, module.eval(), sample, sample_predictions)


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


def signature_of(transform: FeatureTransform) -> dict[str, Any]:
    """Inputs and outputs of the bundle; every input accepts null (imputed or the unknown category)."""
    inputs = [{"name": c.name, "type": "numeric", "nullable": True} for c in transform.numeric] + \
        [{"name": c.name, "type": "categorical", "nullable": True} for c in transform.categorical]
    return {"inputs": inputs, "outputs": {"task": transform.task,
                                          "classes": list(transform.classes) if transform.classes else None}}


@contextmanager
def quiet_torchscript() -> Iterator[None]:
    """Silence torch's notice that TorchScript is deprecated (torch >= 2.10), and only that notice.

    TorchScript is still the bundle format: it loads without the Python classes and runs every network here
    exactly; without this, a process that turns warnings into errors could not load a bundle.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        yield
