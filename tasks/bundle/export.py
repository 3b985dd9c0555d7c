"""Exporting a trained model as a bundle (:mod:`kiln.tasks.bundle.load` describes the layout and reads it back)."""

from __future__ import annotations

import io
import logging
import math
import re
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

from kiln.tasks.bundle.baseline import BASELINE_FILES, BaselineConfig, write_baseline
from kiln.tasks.bundle.load import (
    BUNDLE_FORMAT_VERSION,
    DATA_FILES,
    EXPORT_TOLERANCE,
    MANIFEST_FILE,
    MODEL_FILE,
    ONNX_FILE,
    SAMPLE_FILE,
    SAMPLE_PREDICTIONS_FILE,
    SIGNATURE_FILE,
    BundleError,
    load_bundle,
    onnx_predictor,
    signature_of,
)
from kiln.tasks.bundle.parity import PARITY_RULE, scaled_difference
from kiln.tasks.bundle.program import PROGRAM_FILE, export_program, load_program, save_program
from kiln.tasks.features.records import records_from_frame
from kiln.tasks.features.splits import TEST_RAW_FILE
from kiln.tasks.features.transform import FEATURE_SPEC_FILE, FeatureTransform
from kiln.tasks.storage.artifacts import atomic_write_bytes, file_sha256, read_json, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportConfig:
    """Settings of :func:`export_bundle`."""

    features_dir: Path
    """The ``build_features`` output folder (``feature_spec.json``, ``test_raw.parquet``)."""
    model_dir: Path
    """The ``train`` output folder: ``model.pt2`` (the exported program), or only ``model.pt`` (a train output
    from before ``model.pt2``: the program is exported here, which needs kiln's built-in networks)."""
    sample_rows: int = 64
    """Raw test rows kept as the bundle's sample (fewer if the test split is smaller); at least 1."""
    metadata: dict[str, str] = field(default_factory=dict)
    """Provenance copied into ``bundle.json`` (e.g. pipeline, run_key, mlflow_run_id, spec_hash, data_hash,
    code_version)."""
    baseline: BaselineConfig | None = None
    """The training baseline to write into the bundle (:mod:`kiln.tasks.bundle.baseline`); ``None``: none."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "features_dir", Path(self.features_dir))
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        if isinstance(self.sample_rows, bool) or not isinstance(self.sample_rows, int) or self.sample_rows < 1:
            raise ValueError(f"ExportConfig.sample_rows must be an integer >= 1, found {self.sample_rows!r}")
        if not isinstance(self.metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise ValueError(f"ExportConfig.metadata must map strings to strings, found {self.metadata!r}; "
                             "convert values with str() first")
        if self.baseline is not None and not isinstance(self.baseline, BaselineConfig):
            raise ValueError(f"ExportConfig.baseline must be a BaselineConfig or None, found {self.baseline!r}")


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_bundle` wrote."""

    bundle_dir: Path
    manifest: dict[str, Any]
    """The content of ``bundle.json``."""
    sample_rows: int
    """Rows in ``sample.parquet``."""
    max_diff: float
    """Largest difference between the bundle's and training's predictions on the sample."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (e.g. for XCom)."""
        return {"bundle_dir": str(self.bundle_dir), "manifest": self.manifest, "sample_rows": self.sample_rows,
                "max_diff": self.max_diff}


def export_bundle(config: ExportConfig, out_dir: Path) -> ExportResult:
    """Write the bundle of a trained model into ``out_dir`` and check it by loading it back.

    The bundle's program is the train output's ``model.pt2``, copied; ``model.onnx`` is added when the program
    converts to ONNX and ONNX Runtime reproduces the sample predictions within :data:`EXPORT_TOLERANCE` (else
    ``bundle.json`` says why, a warning is logged, and the bundle serves with the torch runtime). With
    ``config.baseline``, the training baseline's two files are written too, and hashed like the others.

    Args:
        config: where the features and the model are, sample size and provenance.
        out_dir: the folder to write into (created if needed; the caller publishes it).

    Returns:
        The manifest and the largest prediction difference found by the self-check.

    Raises:
        FileNotFoundError: ``feature_spec.json``, ``test_raw.parquet`` or the model (``model.pt2``, or
            ``model.pt`` in an older train output) is missing.
        ModelExportError: the network of a ``model.pt``-only train output cannot be exported (the message names
            the operation and the fix), or this torch cannot load ``model.pt2``.
        BundleError: the model does not fit the features, the test split is empty, the model predicts
            non-finite values, or a runtime's predictions on the sample differ from training's by more than
            :data:`EXPORT_TOLERANCE`.
        BaselineError: the baseline's rows or predictions do not fit the model
            (:func:`kiln.tasks.bundle.baseline.write_baseline`).
    """
    from kiln.tasks.training.networks import MODEL_FILE as TRAINED_MODEL_FILE  # to read older train outputs

    out_dir = Path(out_dir)
    spec_path, raw_path = config.features_dir / FEATURE_SPEC_FILE, config.features_dir / TEST_RAW_FILE
    program_path, older = config.model_dir / PROGRAM_FILE, config.model_dir / TRAINED_MODEL_FILE
    model_path = older if older.is_file() and not program_path.is_file() else program_path
    for path in (spec_path, raw_path, model_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; run build_features and train before exporting")
    transform = FeatureTransform.load(spec_path)
    sample = pd.read_parquet(raw_path, columns=transform.input_columns).head(config.sample_rows)
    if sample.empty:
        raise BundleError(f"{raw_path} has 0 rows: the bundle needs sample rows for its parity check; "
                          "give the test split at least one row (features.test_fraction)")
    sample = sample.reset_index(drop=True)
    x = transform.transform(sample)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model_path == program_path:
        loaded = load_program(program_path)
        program, meta = loaded.program, loaded.meta
        _check_model_fits(meta, transform, program_path)
        # The train step checked the program against the trained module when it exported it.
        expected = _finite(loaded.predict(x), program_path, raw_path)
        atomic_write_bytes(out_dir / MODEL_FILE, program_path.read_bytes())
    else:
        program, meta, expected = _export_trained(model_path, transform, x, raw_path, out_dir)
    assert program is not None  # load_program keeps the program
    onnx = _write_onnx(program, x, expected, out_dir)
    atomic_write_bytes(out_dir / FEATURE_SPEC_FILE, spec_path.read_bytes())
    if config.baseline is not None:
        write_baseline(config.baseline, out_dir, transform.input_columns, transform.classes)
    manifest = _write_rest(out_dir, transform, sample, expected,
                           {"model": meta, "metadata": config.metadata, "onnx": onnx,
                            "baseline": config.baseline is not None})
    max_diff = _self_check(out_dir, sample, expected, manifest["runtimes"])
    log.info("export_bundle: %s model (%d inputs -> %d features) exported to %s with runtimes %s; %d sample rows, "
             "max difference %.3g", transform.task, len(transform.input_columns), transform.input_dim, out_dir,
             "/".join(manifest["runtimes"]), len(sample), max_diff)
    return ExportResult(bundle_dir=out_dir, manifest=manifest, sample_rows=len(sample), max_diff=max_diff)


def _export_trained(model_path: Path, transform: FeatureTransform, x: np.ndarray, raw_path: Path, out_dir: Path
                    ) -> tuple[torch.export.ExportedProgram, dict[str, Any], np.ndarray]:
    """Export the network of a train output from before ``model.pt2`` (``model.pt`` of a built-in network) into
    ``out_dir``, so that its runs still register; the program, its meta and the eager module's predictions."""
    from kiln.tasks.training.networks import load_model, predict

    model = load_model(model_path.parent)
    _check_model_fits(model.meta, transform, model_path)
    expected = _finite(predict(model, x), model_path, raw_path)
    program = export_program(model.module, torch.from_numpy(x), transform.task, source=f"the network in {model_path}")
    save_program(program, out_dir / MODEL_FILE, model.meta)
    return program, model.meta, expected


def _finite(predictions: np.ndarray, model_path: Path, raw_path: Path) -> np.ndarray:
    """``predictions``, refused when one is NaN or infinite."""
    if not np.isfinite(predictions).all():
        raise BundleError(f"the model {model_path} predicts non-finite values for the sample rows of {raw_path}; "
                          "training diverged: lower the learning rate or check the features")
    return predictions


def _check_model_fits(meta: dict[str, Any], transform: FeatureTransform, model_path: Path) -> None:
    """The trained network must take the transform's features and give its outputs."""
    found = (meta.get("task"), meta.get("input_dim"), meta.get("n_outputs"))
    wanted = (transform.task, transform.input_dim, transform.n_outputs)
    if found != wanted:
        raise BundleError(f"{model_path.name} (task, input_dim, n_outputs) = {found} does not fit the feature spec's "
                          f"{wanted}; export the model trained on these features")


def _write_onnx(program: torch.export.ExportedProgram, x: np.ndarray, expected: np.ndarray, out_dir: Path
                ) -> dict[str, Any]:
    """Write ``model.onnx`` when the program converts and ONNX Runtime reproduces ``expected``; the manifest's
    ``onnx`` entry (``file`` and ``opset``, or ``file: null`` and the ``reason``)."""
    target = out_dir / ONNX_FILE
    asserts = sorted({str(n.target) for n in program.graph.nodes if "_assert_async" in str(n.target)})
    try:
        if asserts:  # the converter drops them: the ONNX model would answer where the program raises
            raise _NotFaithful(f"the program checks values at run time ({', '.join(asserts)}), which ONNX drops")
        with _quiet_converter():
            converted = torch.onnx.export(program, (), dynamo=True, verbose=False)
        assert converted is not None  # None only when given a file to write
        proto = converted.model_proto
        atomic_write_bytes(target, proto.SerializeToString())
        reason = _onnx_mismatch(onnx_predictor(target, threads=1), x, expected)
    except _NotFaithful as exc:
        reason = str(exc)
    except ImportError as exc:
        reason = f"ONNX Runtime is not installed where the bundle was exported, so no conversion is checked ({exc})"
    except Exception as exc:  # noqa: BLE001 - the converter raises many types; the torch runtime is the fallback
        reason = f"the ONNX conversion failed: {_conversion_problem(exc)}"
    if reason is None:
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        return {"file": ONNX_FILE, "opset": opset}
    target.unlink(missing_ok=True)
    log.warning("export_bundle: no %s in %s: %s; the bundle serves with the torch runtime", ONNX_FILE, out_dir,
                reason)
    return {"file": None, "reason": reason}


class _NotFaithful(Exception):
    """The program holds something that its ONNX conversion would not keep."""


def _onnx_mismatch(run: Any, x: np.ndarray, expected: np.ndarray) -> str | None:
    """Why ONNX Runtime's predictions are not training's (the sample at once, then its first row alone, so that a
    batch size fixed in the graph shows), or ``None``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    for rows, want in ((x, expected), (x[:1], expected[:1])):
        got = run(rows)
        diff = float(np.max(scaled_difference(got, want))) if got.shape == want.shape else math.inf
        if not diff <= EXPORT_TOLERANCE:  # also catches NaN
            shape = f"shape {list(got.shape)} for {list(want.shape)}" if got.shape != want.shape else f"{diff:.3g}"
            return (f"ONNX Runtime's predictions for {len(rows)} sample row(s) differ from training's by {shape} "
                    f"(allowed {EXPORT_TOLERANCE:g}, {PARITY_RULE})")
    return None


def _conversion_problem(exc: BaseException) -> str:
    """The innermost cause of a conversion error (the converter wraps it in generic advice): typically the operator
    that has no ONNX translation."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return f"{type(exc).__name__}: {' '.join(text.split())[:500]}"


@contextmanager
def _quiet_converter() -> Iterator[None]:
    """Silence the ONNX converter: it logs a warning per torchvision operator it cannot register (torchvision is
    not installed) and raises warnings from its own internals, which would fail a run that turns warnings into
    errors. Its result is judged by its predictions instead."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _write_rest(out_dir: Path, transform: FeatureTransform, sample: pd.DataFrame, expected: np.ndarray,
                provenance: dict[str, Any]) -> dict[str, Any]:
    """Write the signature, the sample and, last, the manifest (with every file's hash); the manifest."""
    write_json(out_dir / SIGNATURE_FILE, signature_of(transform))
    buf = io.BytesIO()
    sample.to_parquet(buf, index=False)
    atomic_write_bytes(out_dir / SAMPLE_FILE, buf.getvalue())
    buf = io.BytesIO()
    np.save(buf, expected, allow_pickle=False)
    atomic_write_bytes(out_dir / SAMPLE_PREDICTIONS_FILE, buf.getvalue())
    onnx = provenance["onnx"]
    files = (MODEL_FILE, *((ONNX_FILE,) if onnx["file"] else ()), *DATA_FILES,
             *(BASELINE_FILES if provenance["baseline"] else ()))
    write_json(out_dir / MANIFEST_FILE, {
        "format_version": BUNDLE_FORMAT_VERSION, "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__, "task": transform.task, "model": provenance["model"],
        "metadata": dict(provenance["metadata"]), "sample_rows": len(sample),
        "runtimes": ["onnx", "torch"] if onnx["file"] else ["torch"], "onnx": onnx,
        "files": {name: file_sha256(out_dir / name) for name in files},
    })
    return read_json(out_dir / MANIFEST_FILE)  # as readers see it (e.g. paths in the model meta as strings)


def _self_check(out_dir: Path, sample: pd.DataFrame, expected: np.ndarray, runtimes: list[str]) -> float:
    """Load the written bundle with each of its runtimes and replay the sample through both serving paths (and its
    first record alone); the largest difference."""
    max_diff = 0.0
    records = records_from_frame(sample)
    for runtime in runtimes:
        bundle = load_bundle(out_dir, runtime)  # type: ignore[arg-type]
        for path, got, want in (("frame", bundle.predict_frame(sample), expected),
                                ("records", bundle.predict_records(records), expected),
                                ("one record", bundle.predict_records(records[:1]), expected[:1])):
            diff = float(np.max(scaled_difference(got, want))) if got.shape == want.shape else math.inf
            if not diff <= EXPORT_TOLERANCE:  # also catches NaN
                raise BundleError(f"the exported bundle in {out_dir} predicts the sample ({runtime} runtime, {path} "
                                  f"path) with a difference of {diff:.3g} from training's predictions (allowed "
                                  f"{EXPORT_TOLERANCE:g}, {PARITY_RULE}); the model does not export faithfully: "
                                  "check the network's forward() and the torch version")
            max_diff = max(max_diff, diff)
    return max_diff
