"""Helpers shared by the training benchmarks: synthetic features folders and the one-line JSON result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd


def write_synthetic_features(folder: Path, *, rows: int, dim: int, n_classes: int, seed: int = 0) -> Path:
    """A features folder in the ``build_features`` layout (``f0..f{d-1}`` + ``target``, ``feature_spec.json``).

    Benchmarks only: the classes come from a random linear map, so the data is learnable but means nothing.
    """
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(dim, n_classes)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", rows), ("val", max(rows // 10, 1)), ("test", max(rows // 10, 1))):
        x = rng.normal(size=(n, dim)).astype(np.float32)
        df = pd.DataFrame(x, columns=[f"f{i}" for i in range(dim)])
        df["target"] = (x @ weights).argmax(1).astype(np.int64)
        df.to_parquet(folder / f"{split}.parquet")
    spec = {"input_dim": dim, "n_classes": n_classes, "task": "classification"}
    (folder / "feature_spec.json").write_text(json.dumps(spec))
    return folder


def steady_samples_per_s(history: list[dict], samples_per_epoch: int, skip: int = 1) -> float:
    """Throughput over the epochs after the first ``skip`` (warm-up), from per-epoch ``train/samples_per_s``."""
    epochs = history[skip:]
    seconds = sum(samples_per_epoch / h["train/samples_per_s"] for h in epochs)
    return samples_per_epoch * len(epochs) / seconds


def emit(name: str, value: float, unit: str, peer: str, peer_value: float, target: str,
         ratio: float | None = None) -> None:
    """Print the result line that ``bench/run_all.py`` reads (it must be the last line printed).

    ``ratio`` defaults to ``value / peer_value``; pass one measured in pairs where the machine's speed drifts.
    """
    ratio = value / peer_value if ratio is None else ratio
    print(json.dumps({"name": name, "value": round(value, 3), "unit": unit, "peer": peer,
                      "peer_value": round(peer_value, 3), "ratio": round(ratio, 3), "target": target}))
