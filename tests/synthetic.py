"""Small synthetic features folders in the ``build_features`` layout, for training tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd


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
