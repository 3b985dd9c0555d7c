"""The model bundle: the self-contained, servable form of a trained model.

A bundle is a folder that a model server loads without the training code: the network with its output head (its
output is exactly what :func:`kiln.tasks.training.networks.predict` gives: softmax probabilities or regression
values) as a ``torch.export`` program and, where the converter manages it faithfully, as ONNX; the fitted feature
transform, a signature of inputs and outputs, sample raw rows with the predictions training made for them (for
parity checks before and after deployment), and a manifest with versions and provenance::

    bundle.json               format_version, created_at, torch version, model meta, provenance, runtimes, file hashes
    model.pt2                 torch.export program: float32 features [n, d] -> probabilities [n, k] or values [n]
    model.onnx                the same as ONNX (absent when it cannot be converted faithfully: bundle.json says why)
    feature_spec.json         the FeatureTransform (as written by build_features)
    signature.json            inputs (name, numeric|categorical, nullable) and outputs (task, classes)
    sample.parquet            raw sample rows (input columns only) from the test split
    sample_predictions.npy    training-side predictions of those rows
    baseline.json, baseline_sample.parquet   the training baseline (:mod:`kiln.tasks.bundle.baseline`), optional

A loaded bundle predicts with one runtime (:data:`kiln.tasks.settings.ServeRuntime`): ``onnx`` (ONNX Runtime on
``model.onnx``) or ``torch`` (the exported program); ``auto`` takes ONNX Runtime when the bundle has ``model.onnx``.
Format 1 bundles (TorchScript ``model.ts``, from before format 2) still load, with the ``torchscript`` runtime.

:func:`kiln.tasks.bundle.export.export_bundle` writes one and checks it by loading it back through every runtime;
:func:`load_bundle` reads one, refusing a folder that is incomplete, altered or of another format version
(:class:`BundleError`). A model server imports this module only: loading needs neither the training code nor the
pipeline's spec.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from kiln.tasks.bundle.files import BASELINE_FILES, MANIFEST_FILE
from kiln.tasks.bundle.program import PROGRAM_FILE, ModelExportError, load_program, program_runner
from kiln.tasks.features.records import RecordError, RecordTransform, records_from_frame
from kiln.tasks.features.transform import FEATURE_SPEC_FILE, FeatureTransform
from kiln.tasks.settings import SERVE_RUNTIMES, ServeRuntime
from kiln.tasks.storage.artifacts import file_sha256, read_json

__all__ = ["BUNDLE_FORMAT_VERSION", "MANIFEST_FILE", "MODEL_FILE", "ONNX_FILE", "SAMPLE_FILE",
           "SAMPLE_PREDICTIONS_FILE", "SIGNATURE_FILE", "Bundle", "BundleError", "RecordError", "load_bundle",
           "records_from_frame"]

log = logging.getLogger(__name__)

#: Version of the bundle layout that :func:`kiln.tasks.bundle.export.export_bundle` writes.
BUNDLE_FORMAT_VERSION = 2
#: Versions :func:`load_bundle` reads: this one, and 1 so that versions registered before it stay servable.
READABLE_VERSIONS = (1, 2)
#: The exported torch program, in every bundle of format 2.
MODEL_FILE = PROGRAM_FILE
#: The model as ONNX, in the bundles whose program converts faithfully.
ONNX_FILE = "model.onnx"
SIGNATURE_FILE = "signature.json"
SAMPLE_FILE = "sample.parquet"
SAMPLE_PREDICTIONS_FILE = "sample_predictions.npy"
#: The files of every bundle beside its model files.
DATA_FILES = (FEATURE_SPEC_FILE, SIGNATURE_FILE, SAMPLE_FILE, SAMPLE_PREDICTIONS_FILE)
#: Largest difference allowed between the exported model's predictions and training's on the sample.
EXPORT_TOLERANCE = 1e-5
#: The runtime ``auto`` takes for a bundle with ``model.onnx`` (faster here: BENCHMARKS.md, serving_runtimes).
AUTO_WITH_ONNX: ServeRuntime = "onnx"
_REEXPORT = "re-export it with kiln.tasks.bundle.export.export_bundle (the register step)"
_RUNTIME_SETTING = "the model server's --runtime flag or KILN_SERVE_RUNTIME"

#: Features ``[n, d]`` float32 (C-contiguous, n >= 1) -> predictions, as the bundle's runtime computes them.
Predictor = Callable[[np.ndarray], np.ndarray]


class BundleError(ValueError):
    """A bundle that cannot be written or loaded: unreadable, incomplete, altered or of another format."""


def content_files(manifest: dict[str, Any]) -> tuple[str, ...]:
    """Every file a bundle with this manifest holds but the manifest, which lists their sha256 (the optional ones,
    ``model.onnx`` and the baseline's, where it lists them)."""
    if manifest.get("format_version") == 1:
        return (_TORCHSCRIPT_FILE, *DATA_FILES)
    listed = manifest["files"] if isinstance(manifest.get("files"), dict) else {}
    with_baseline = BASELINE_FILES if any(name in listed for name in BASELINE_FILES) else ()
    return (MODEL_FILE, *((ONNX_FILE,) if ONNX_FILE in listed else ()), *DATA_FILES, *with_baseline)


class Bundle:
    """A loaded bundle: transform records, predict, format answers. Safe to share between threads.

    Attributes:
        path: the bundle folder.
        manifest: the content of ``bundle.json``.
        transform: the fitted feature transform.
        signature: the content of ``signature.json``.
        runtime: what runs the model: ``onnx``, ``torch`` or (a format 1 bundle) ``torchscript``.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], transform: FeatureTransform, signature: dict[str, Any],
                 predictor: Predictor, runtime: str, sample: pd.DataFrame, sample_predictions: np.ndarray):
        self.path = path
        self.manifest = manifest
        self.transform = transform
        self.signature = signature
        self.runtime = runtime
        self._predictor = predictor
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

    @property
    def runtimes(self) -> tuple[str, ...]:
        """The runtimes this bundle can be served with (``onnx`` only where it holds ``model.onnx``)."""
        if self.manifest.get("format_version") == 1:
            return ("torchscript",)
        return ("onnx", "torch") if ONNX_FILE in self.manifest["files"] else ("torch",)

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
        if len(x) == 0:  # the exported program's batch dimension starts at 1
            return np.zeros((0,) if self._classes is None else (0, len(self._classes)), np.float32)
        return self._predictor(np.ascontiguousarray(x, dtype=np.float32))

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
        return (f"Bundle({str(self.path)!r}, task={self.task!r}, inputs={len(self.input_columns)}, "
                f"runtime={self.runtime!r})")


def load_bundle(path: str | Path, runtime: ServeRuntime = "auto", *, threads: int | None = None) -> Bundle:
    """Load a bundle folder written by :func:`export_bundle`.

    Args:
        path: the bundle folder.
        runtime: what runs the model: ``auto`` (ONNX Runtime when the bundle has ``model.onnx``, else the
            exported torch program), ``onnx`` or ``torch``. A format 1 bundle runs TorchScript under ``auto`` and
            ``torch``.
        threads: intra-op threads of an ONNX Runtime session (default: torch's, ``torch.get_num_threads()``, which
            the torch runtimes use).

    Returns:
        The loaded bundle, its model ready on CPU.

    Raises:
        ValueError: ``runtime`` is not one of ``auto``, ``onnx``, ``torch``.
        BundleError: the folder or a file is missing, a file does not match its hash in ``bundle.json``, the
            format version is not one of :data:`READABLE_VERSIONS`, a file cannot be read, or ``runtime`` is
            ``onnx`` and the bundle has no ``model.onnx`` (or ONNX Runtime is not installed); the message names
            the file and the fix.
    """
    if runtime not in SERVE_RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(SERVE_RUNTIMES)}, found {runtime!r}")
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
    if manifest["format_version"] == 1:
        chosen, predictor = _open_torchscript(path, manifest, runtime)
    else:
        chosen, predictor = _open_runtime(path, manifest, runtime,
                                          torch.get_num_threads() if threads is None else threads)
    return Bundle(path, manifest, transform, signature, predictor, chosen, sample, sample_predictions)


def _open_runtime(path: Path, manifest: dict[str, Any], runtime: str, threads: int) -> tuple[str, Predictor]:
    """The runtime ``runtime`` resolves to for a format 2 bundle, and its predictor."""
    has_onnx = ONNX_FILE in manifest["files"]
    if runtime == "onnx" and not has_onnx:
        why = (manifest.get("onnx") or {}).get("reason") or "not converted"
        raise BundleError(f"bundle {path} has no {ONNX_FILE} ({why}), so it cannot be served with runtime 'onnx'; "
                          f"choose 'auto' or 'torch' ({_RUNTIME_SETTING})")
    if runtime == "onnx" or (runtime == "auto" and has_onnx and AUTO_WITH_ONNX == "onnx"):
        try:
            return "onnx", onnx_predictor(path / ONNX_FILE, threads)
        except ImportError as exc:
            if runtime == "onnx":
                raise BundleError(f"runtime 'onnx' needs ONNX Runtime, which is not installed here ({exc}): pip "
                                  f"install onnxruntime, or choose 'auto' or 'torch' ({_RUNTIME_SETTING})") from None
            # A real fallback: the program is in every bundle and predicts the same (export checked both).
            log.warning("ONNX Runtime is not installed (%s): bundle %s runs with the torch runtime", exc, path)
    try:
        loaded = load_program(path / MODEL_FILE)
    except ModelExportError as exc:
        raise BundleError(f"bundle file {path / MODEL_FILE} cannot be loaded (exported with torch "
                          f"{manifest.get('torch_version')}): {exc}; {_REEXPORT}") from None
    assert loaded.program is not None  # load_program always keeps it
    return "torch", _torch_predictor(program_runner(loaded.program))


def _torch_predictor(module: Callable[[torch.Tensor], torch.Tensor]) -> Predictor:
    def predict(x: np.ndarray) -> np.ndarray:
        if not x.flags.writeable:  # torch.from_numpy warns on read-only memory (e.g. np.frombuffer)
            x = x.copy()
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()

    return predict


def onnx_predictor(file: Path, threads: int) -> Predictor:
    """An ONNX Runtime session on ``file`` with ``threads`` intra-op threads, sequential (one op at a time).

    Raises:
        ImportError: onnxruntime is not installed.
        BundleError: the file is not a model ONNX Runtime can run (one float input, one output).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle pool threads would spin on the cores the server's event loop needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its warnings are about graph optimisations
    try:
        session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        (given,), wanted = session.get_inputs(), [o.name for o in session.get_outputs()]
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise BundleError(f"bundle file {file} cannot be loaded by ONNX Runtime {ort.__version__}: {exc}; "
                          f"choose the runtime 'torch' ({_RUNTIME_SETTING}) or {_REEXPORT}") from None
    if len(wanted) != 1:
        raise BundleError(f"bundle file {file} has {len(wanted)} outputs, not 1; {_REEXPORT}")
    run, name = session.run, given.name
    return lambda x: run(wanted, {name: x})[0]


def _read_manifest(path: Path) -> dict[str, Any]:
    """``bundle.json``, checked: a readable format version, and every listed file present with its hash."""
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
    if version not in READABLE_VERSIONS:
        raise BundleError(f"bundle file {file} has format_version {version!r}; this code reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))}: {_REEXPORT}, or serve it with a matching kiln "
                          "version")
    if not isinstance(manifest.get("files"), dict):
        raise BundleError(f"bundle file {file} lacks the 'files' hashes; {_REEXPORT}")
    expected = content_files(manifest)
    if unlisted := sorted(set(manifest["files"]) - set(expected)):
        raise BundleError(f"bundle file {file} lists {', '.join(unlisted)}, which a format {version} bundle does "
                          f"not hold; {_REEXPORT}")
    if version != 1 and ONNX_FILE not in expected and (path / ONNX_FILE).exists():
        raise BundleError(f"bundle {path} holds {ONNX_FILE}, which {MANIFEST_FILE} does not list (added after the "
                          f"export); remove it, copy the bundle again or {_REEXPORT}")
    for name in expected:
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


# --- Format 1 (TorchScript ``model.ts``), read only ---------------------------------------------------------------
# Versions registered before format 2 stay servable, so that a deployment of one, or a rollback to one, still
# works. Nothing writes format 1; this goes when no registered version of that format is left.
_TORCHSCRIPT_FILE = "model.ts"


def _open_torchscript(path: Path, manifest: dict[str, Any], runtime: str) -> tuple[str, Predictor]:
    if runtime == "onnx":
        raise BundleError(f"bundle {path} is of format 1 (TorchScript {_TORCHSCRIPT_FILE}, no {ONNX_FILE}), so it "
                          f"cannot be served with runtime 'onnx'; choose 'auto' or 'torch' ({_RUNTIME_SETTING}), or "
                          f"{_REEXPORT}")
    try:
        with quiet_torchscript():
            module = torch.jit.load(str(path / _TORCHSCRIPT_FILE), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as exc:
        raise BundleError(f"bundle file {path / _TORCHSCRIPT_FILE} cannot be loaded as TorchScript by torch "
                          f"{torch.__version__} (exported with torch {manifest.get('torch_version')}): {exc}; "
                          f"{_REEXPORT}") from None
    return "torchscript", _torch_predictor(module.eval())


@contextmanager
def quiet_torchscript() -> Iterator[None]:
    """Silence torch's notice that TorchScript is deprecated (torch >= 2.10), and only that notice, while a format 1
    bundle loads: without this, a process that turns warnings into errors could not serve one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        yield
