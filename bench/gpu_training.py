"""gpu_training: training throughput of one leased GPU (NCCL, bf16 autocast) against every CPU core of the same
machine, on the ``ddp_scaling`` model with more rows.

Both runs go through ``LocalTorchrunLauncher`` and a lease from this machine's pool (``discover_local``): the GPU
run leases 1 GPU, the CPU run leases none (so ``CUDA_VISIBLE_DEVICES`` hides the GPU) and trains with one thread
per core. Same synthetic data (1,000,000 rows x 64 features, 10 classes), model (MLP 512-512-256), per-rank batch
(4,096), seed and epochs; each reads the steady ``samples_per_s`` (after the first epoch). Ratio = GPU / CPU;
target >= 5. On a machine without a CUDA GPU the benchmark reports itself skipped and writes no row.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from _common import emit, steady_samples_per_s, write_synthetic_features

from kiln.tasks.launch.torchrun import LocalTorchrunLauncher
from kiln.tasks.pools.allocation import LeaseRequest, Owner
from kiln.tasks.pools.inventory import LOCAL_POOL, discover_local
from kiln.tasks.pools.store import LeaseStore
from kiln.tasks.spec import ModelSpec, TrainingSpec
from kiln.tasks.training.job import METRICS_FILE, TrainConfig

ROWS, DIM, CLASSES, BATCH, EPOCHS = 1_000_000, 64, 10, 4096, 4
MODEL = ModelSpec(hidden_sizes=[512, 512, 256])


def measure(store: LeaseStore, features: Path, root: Path, gpus: int, threads: int) -> dict:
    config = TrainConfig(features_dir=str(features), output_dir=str(root / "out"), checkpoint_dir=str(root / "ckpt"),
                         task="classification", model=MODEL,
                         training=TrainingSpec(epochs=EPOCHS, batch_size=BATCH, learning_rate=1e-3, seed=0,
                                               threads_per_proc=threads, log_every_steps=100, timeout_s=900))
    allocation = store.try_acquire(LeaseRequest(pool=LOCAL_POOL, gpus=gpus), Owner(host="bench", pid=os.getpid()))
    assert allocation is not None, f"could not lease {gpus} GPU(s) from the local pool"
    try:
        launched = LocalTorchrunLauncher().launch(config, nproc=1, workdir=root / "work", allocation=allocation)
    finally:
        store.release(allocation.lease_id)
    metrics = json.loads((root / "out" / METRICS_FILE).read_text())
    metrics["steady"] = steady_samples_per_s(metrics["history"], ROWS)
    print(f"{metrics['device']} ({metrics['device_name'] or f'{threads} threads'}, backend {metrics['backend']}, "
          f"amp {metrics['amp']}): {metrics['steady']:.0f} samples/s after the first epoch; job "
          f"{launched.duration_s:.1f} s; val accuracy {metrics['final']['val/accuracy']:.3f}", flush=True)
    return metrics


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    if not torch.cuda.is_available():
        print(json.dumps({"name": "gpu_training", "skipped": "no CUDA GPU on this machine"}))
        return
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp, \
            LeaseStore(f"sqlite:///{tmp}/pools.db", discover_local()) as store:
        features = write_synthetic_features(Path(tmp) / "features", rows=ROWS, dim=DIM, n_classes=CLASSES)
        gpu = measure(store, features, Path(tmp) / "gpu", gpus=1, threads=1)
        cpu = measure(store, features, Path(tmp) / "cpu", gpus=0, threads=cores)
    assert (gpu["device"], cpu["device"]) == ("cuda", "cpu"), "the lease did not decide the device"
    emit("gpu_training", gpu["steady"], "samples/s",
         f"same job on the same machine's {cores} CPU cores, no GPU leased (GPU: {gpu['device_name']}, "
         f"{gpu['backend']}, {gpu['amp']} autocast)", cpu["steady"], ">= 5")


if __name__ == "__main__":
    main()
