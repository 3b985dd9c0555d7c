"""train_harness: throughput of ``kiln.tasks.training.loop.run_train`` against a minimal plain-PyTorch loop.

Same synthetic data (20,000 rows x 32 features, 4 classes), model (MLP 64-32), batch (64), optimizer (Adam),
seed and thread count (1) on both sides. Both time the training loop of each epoch, data shuffling included;
run_train's per-epoch validation, checkpoint and MLflow work happen outside that window, as they are not part of
the training step. The first epoch of each run is warm-up and not counted. The two sides alternate in 30 short rounds
(which one goes first alternates too); value and peer_value are the medians of each side's per-epoch throughputs,
and the ratio is the median of the per-round ratios, so that the speed drift of a shared 2-core VM (+-20% within
a minute) cancels out. Ratio = run_train / plain; target >= 0.95.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import emit, write_synthetic_features

from kiln.tasks.spec import ModelSpec, TrainingSpec
from kiln.tasks.training.job import TrainConfig
from kiln.tasks.training.loop import run_train
from kiln.tasks.training.networks import build_model

ROWS, DIM, CLASSES, BATCH, EPOCHS, ROUNDS, SEED, LR = 20_000, 32, 4, 64, 3, 30, 0, 1e-3
MODEL = ModelSpec(hidden_sizes=[64, 32])


def ours(features: Path, root: Path) -> list[float]:
    """Samples/s of each epoch after the first."""
    config = TrainConfig(features_dir=str(features), output_dir=str(root / "out"), checkpoint_dir=str(root / "ckpt"),
                         task="classification", model=MODEL,
                         training=TrainingSpec(epochs=EPOCHS, batch_size=BATCH, learning_rate=LR, seed=SEED,
                                               threads_per_proc=1, log_every_steps=100))
    run_train(config)
    history = json.loads((root / "out" / "train_metrics.json").read_text())["history"]
    return [h["train/samples_per_s"] for h in history[1:]]


def plain(x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Samples/s of each epoch after the first."""
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    model = build_model(MODEL, DIM, CLASSES)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(SEED)
    seconds = []
    for _ in range(EPOCHS):
        start = time.perf_counter()
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), BATCH):
            idx = order[i:i + BATCH]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    return [len(x) / s for s in seconds[1:]]


def main() -> None:
    os.sched_setaffinity(0, {0})  # both sides on the same core: no migrations between the machine's two cores
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        features = write_synthetic_features(Path(tmp) / "features", rows=ROWS, dim=DIM, n_classes=CLASSES)
        df = pd.read_parquet(features / "train.parquet")
        x = torch.tensor(np.ascontiguousarray(df[[f"f{i}" for i in range(DIM)]].to_numpy(), dtype=np.float32))
        y = torch.tensor(df["target"].to_numpy(), dtype=torch.int64)
        ours_epochs, plain_epochs, ratios = [], [], []
        for r in range(ROUNDS):  # which side goes first alternates, so neither always runs on a warmer machine
            if r % 2:
                plain_epochs += plain(x, y)
            ours_epochs += ours(features, Path(tmp) / f"run{r}")
            if not r % 2:
                plain_epochs += plain(x, y)
            ours_round = statistics.median(ours_epochs[-(EPOCHS - 1):])
            plain_round = statistics.median(plain_epochs[-(EPOCHS - 1):])
            ratios.append(ours_round / plain_round)
            print(f"round {r + 1}: run_train {ours_round:.0f} samples/s, plain loop {plain_round:.0f} samples/s, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
    emit("train_harness", statistics.median(ours_epochs), "samples/s",
         "plain PyTorch loop (same model, data, batch, Adam, 1 thread)", statistics.median(plain_epochs), ">= 0.95",
         ratio=statistics.median(ratios))


if __name__ == "__main__":
    main()
