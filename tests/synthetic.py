"""Small synthetic features folders in the ``build_features`` layout, for training tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kiln.tasks.spec import ModelSpec


def write_features(folder: Path, *, n: int = 400, d: int = 4, task: str = "classification", n_classes: int = 2,
                   seed: int = 0) -> Path:
    """``train/val/test.parquet`` (``f0..f{d-1}`` + ``target``) and ``feature_spec.json``.

    Classification labels are learnable: two classes split by ``x0 + x1 > 0``, three by thresholds on
    ``x0 + x1 * x2``. A regression target is a linear function of the features.
    """
    if task == "classification" and n_classes not in (2, 3):
        raise ValueError(f"n_classes must be 2 or 3, found {n_classes}")
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", n), ("val", n // 4), ("test", n // 4)):
        x = rng.normal(size=(rows, d)).astype(np.float32)
        df = pd.DataFrame({f"f{i}": x[:, i] for i in range(d)})
        if task == "regression":
            df["target"] = (x @ np.linspace(1, 2, d) + 0.5).astype(np.float32)
        elif n_classes == 2:
            df["target"] = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
        else:
            df["target"] = np.digitize(x[:, 0] + x[:, 1] * x[:, 2], [-0.5, 0.5]).astype(np.int64)
        df.to_parquet(folder / f"{split}.parquet")
    spec = {"input_dim": d, "n_classes": n_classes if task == "classification" else 0, "task": task}
    (folder / "feature_spec.json").write_text(json.dumps(spec))
    return folder


def write_run_dirs(tmp_path: Path, df: pd.DataFrame, column_types: dict[str, str], task: str,
                   model_spec: ModelSpec | None = None) -> tuple[Path, Path]:
    """A ``build_features`` folder made by the real step from ``df`` (target column ``y``), and an untrained
    network saved next to it as the ``train`` step would (``model_spec`` default: an MLP with one layer of 8).

    Returns:
        ``(features_dir, model_dir)``.
    """
    import torch

    from kiln.tasks.spec import FeaturesSpec
    from kiln.tasks.steps.build_features import BuildFeaturesConfig, run_build_features
    from kiln.tasks.training.networks import build_model

    clean, features, model = tmp_path / "clean", tmp_path / "features", tmp_path / "model"
    for folder in (clean, features, model):
        folder.mkdir()
    df.to_parquet(clean / "clean.parquet", index=False)
    (clean / "clean_report.json").write_text(json.dumps({"column_types": column_types, "target": "y",
                                                         "task": task}))
    result = run_build_features(BuildFeaturesConfig("y", task, FeaturesSpec(), seed=0), clean, features)
    n_outputs = result.n_classes or 1
    torch.manual_seed(0)
    spec = model_spec or ModelSpec(hidden_sizes=[8])
    save_trained(model, build_model(spec, result.input_dim, n_outputs), spec, result.input_dim, n_outputs, task)
    return features, model


def save_trained(model_dir: Path, module: Any, spec: ModelSpec, input_dim: int, n_outputs: int, task: str) -> None:
    """``module`` saved into ``model_dir`` as the train step saves a model: ``model.pt`` and the exported
    ``model.pt2``."""
    import torch

    from kiln.tasks.bundle.program import PROGRAM_FILE, export_program, save_program
    from kiln.tasks.training.networks import MODEL_FILE, save_model

    save_model(model_dir / MODEL_FILE, module, model_spec=spec, input_dim=input_dim, n_outputs=n_outputs,
               task=task)  # type: ignore[arg-type]
    example = torch.randn(4, input_dim, generator=torch.Generator().manual_seed(0))
    save_program(export_program(module, example, task), model_dir / PROGRAM_FILE,
                 {"task": task, "input_dim": input_dim, "n_outputs": n_outputs})
