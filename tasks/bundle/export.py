"""Exporting a trained model as a bundle (:mod:`kiln.tasks.bundle.load` describes the layout and reads it back)."""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from kiln.tasks.bundle.load import (
    BUNDLE_FORMAT_VERSION,
    CONTENT_FILES,
    EXPORT_TOLERANCE,
    MANIFEST_FILE,
    MODEL_FILE,
    SAMPLE_FILE,
    SAMPLE_PREDICTIONS_FILE,
    SIGNATURE_FILE,
    BundleError,
    load_bundle,
    quiet_torchscript,
    signature_of,
)
from kiln.tasks.bundle.parity import PARITY_RULE, scaled_difference
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
    max_diff: float
    """Largest difference between the bundle's and training's predictions on the sample."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (e.g. for XCom)."""
        return {"bundle_dir": str(self.bundle_dir), "manifest": self.manifest, "sample_rows": self.sample_rows,
                "max_diff": self.max_diff}


class _Servable(nn.Module):
    """The network plus the output head of :func:`kiln.tasks.training.networks.predict`, so that the bundle needs
    no training code."""

    def __init__(self, network: nn.Module, classification: bool):
        super().__init__()
        self.network = network
        self.classification = classification

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        if self.classification:
            return torch.softmax(out, dim=1)
        return out.squeeze(1)


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
    max_diff = _self_check(out_dir, sample, expected)
    log.info("export_bundle: %s model (%d inputs -> %d features) exported to %s; %d sample rows, max difference "
             "%.3g", transform.task, len(transform.input_columns), transform.input_dim, out_dir, len(sample), max_diff)
    return ExportResult(bundle_dir=out_dir, manifest=manifest, sample_rows=len(sample), max_diff=max_diff)


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
    write_json(out_dir / MANIFEST_FILE, {
        "format_version": BUNDLE_FORMAT_VERSION, "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__, "task": transform.task, "model": provenance["model"],
        "metadata": dict(provenance["metadata"]), "sample_rows": len(sample),
        "files": {name: file_sha256(out_dir / name) for name in CONTENT_FILES},
    })
    return read_json(out_dir / MANIFEST_FILE)  # as readers see it (e.g. paths in the model meta as strings)


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
    with quiet_torchscript():
        torch.jit.save(torch.jit.script(_Servable(network, task == "classification").eval()), buf)
    return buf.getvalue()


def _self_check(out_dir: Path, sample: pd.DataFrame, expected: np.ndarray) -> float:
    """Load the written bundle and replay the sample through both serving paths; the largest difference."""
    bundle = load_bundle(out_dir)
    max_diff = 0.0
    for path, got in (("frame", bundle.predict_frame(sample)),
                      ("records", bundle.predict_records(records_from_frame(sample)))):
        diff = float(np.max(scaled_difference(got, expected))) if got.shape == expected.shape else math.inf
        if not diff <= EXPORT_TOLERANCE:  # also catches NaN
            raise BundleError(f"the exported bundle in {out_dir} predicts the sample ({path} path) with a "
                              f"difference of {diff:.3g} from training's predictions (allowed {EXPORT_TOLERANCE:g}, "
                              f"{PARITY_RULE}); the network does not export faithfully: check the model type and "
                              "torch version")
        max_diff = max(max_diff, diff)
    return max_diff
