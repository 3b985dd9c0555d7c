"""ddp_scaling: global training throughput of 2 DDP ranks x 1 thread against 1 rank x 1 thread.

Both runs go through ``LocalTorchrunLauncher`` (torchrun, gloo) with the same synthetic data (120,000 rows x 64
features, 10 classes), model (MLP 512-512-256, 0.56 M parameters), per-rank batch (4,096) and seed, so the 2-rank
run moves twice the samples per step. Each reads ``samples_per_s`` from ``train_metrics.json``: global samples per
second over the training loops only (start-up, validation and checkpoints excluded). On the 2-core machine a gloo
all-reduce of these 2.2 MB of gradients takes about 8-10 ms over loopback, so a step must compute for ~100 ms for
the all-reduce to be small beside it; at a per-rank batch of 256 the same model scales only ~1.4x. Ratio = 2 ranks
/ 1 rank; target >= 1.6.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from _common import emit, steady_samples_per_s, write_synthetic_features

from kiln.tasks.launch.torchrun import LocalTorchrunLauncher
from kiln.tasks.spec import ModelSpec, TrainingSpec
from kiln.tasks.training.job import METRICS_FILE, TrainConfig

ROWS, DIM, CLASSES, BATCH, EPOCHS = 120_000, 64, 10, 4096, 4
MODEL = ModelSpec(hidden_sizes=[512, 512, 256])


def measure(features: Path, root: Path, nproc: int) -> dict:
    config = TrainConfig(features_dir=str(features), output_dir=str(root / "out"), checkpoint_dir=str(root / "ckpt"),
                         task="classification", model=MODEL,
                         training=TrainingSpec(epochs=EPOCHS, batch_size=BATCH, learning_rate=1e-3, seed=0,
                                               threads_per_proc=1, log_every_steps=50, timeout_s=600))
    launched = LocalTorchrunLauncher().launch(config, nproc=nproc, workdir=root / "work")
    metrics = json.loads((root / "out" / METRICS_FILE).read_text())
    steady = steady_samples_per_s(metrics["history"], ROWS)  # DistributedSampler pads ROWS to a multiple of nproc
    print(f"{nproc} rank(s): {metrics['samples_per_s']:.0f} samples/s over all epochs, {steady:.0f} after the first; "
          f"job {launched.duration_s:.1f} s", flush=True)
    return metrics


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        features = write_synthetic_features(Path(tmp) / "features", rows=ROWS, dim=DIM, n_classes=CLASSES)
        one = measure(features, Path(tmp) / "one", nproc=1)
        two = measure(features, Path(tmp) / "two", nproc=2)
    assert len({c["sha256"] for c in two["param_checksums"]}) == 1, "DDP replicas diverged"
    emit("ddp_scaling", two["samples_per_s"], "samples/s", "1 rank x 1 thread (torchrun, same workload)",
         one["samples_per_s"], ">= 1.6")


if __name__ == "__main__":
    main()
