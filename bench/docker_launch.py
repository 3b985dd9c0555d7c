"""docker_launch: a 2-node Docker gang against local torchrun with the same ranks and threads (2 ranks x 1 thread).

Docker: ``DockerGangLauncher``, two ``kiln-train:cpu`` containers on one bridge network (one rank each, c10d
rendezvous, gloo over the bridge). Local: ``LocalTorchrunLauncher``, ``torchrun --standalone`` with 2
ranks (gloo over loopback). Same synthetic data (120,000 rows x 64 features, 10 classes), model (MLP 512-512-256),
per-rank batch (4,096), seed and epochs as ``ddp_scaling``.

Two figures per run:
- time to first training step: from ``launch()`` to the moment the launcher relays rank 0's ``epoch 1/E step 1/N``
  line (``log_every_steps=1``); it includes container start, two torchrun agents, the rendezvous and data loading.
  Target: at most 3 s more than local.
- steady samples/s: global training throughput of the epochs after the first (``train_metrics.json``), as the
  best epoch of each run: other jobs on the shared 2-core machine only ever slow an epoch down, so the fastest
  one is the launcher's own cost (the mean over the epochs is printed too). Target: docker / local >= 0.97.

The machine's speed drifts, so the launchers run in pairs, back to back and in alternating order; the throughput
ratio is the median of the pairs' ratios, the other figures medians over the runs. The JSON line carries the
throughput; the start overhead is in its ``peer`` text and printed above it. Needs ``make image`` (``make bench``
builds it).
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from _common import emit, steady_samples_per_s, write_synthetic_features

from kiln.tasks.launch.base import Launcher
from kiln.tasks.launch.docker_gang import DockerGangLauncher
from kiln.tasks.launch.torchrun import LocalTorchrunLauncher
from kiln.tasks.pools.allocation import Allocation, NodeAllocation
from kiln.tasks.spec import ModelSpec, TrainingSpec
from kiln.tasks.training.job import METRICS_FILE, TrainConfig

ROWS, DIM, CLASSES, BATCH, EPOCHS, PAIRS = 120_000, 64, 10, 4096, 6, 3
MODEL = ModelSpec(hidden_sizes=[512, 512, 256])
START_TARGET_S = 3.0
# No cpuset: the local ranks float over both cores, so the containers do too (a lease would pin each node to its
# cores, which on this shared machine made the gang faster than local and would hide the cost measured here).
GANG = Allocation(lease_id="bench", pool="local", nodes=(NodeAllocation("n0", memory=4 * 1024**3),
                                                         NodeAllocation("n1", memory=4 * 1024**3)))


class _FirstStep(logging.Handler):
    """Records when a launcher relays rank 0's first training step line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.at: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.at is None and "epoch 1/" in record.getMessage() and " step 1/" in record.getMessage():
            self.at = time.monotonic()


def measure(kind: str, features: Path, root: Path) -> tuple[float, float]:
    """One run; returns (seconds to the first training step, global samples/s of the best later epoch)."""
    docker = kind == "docker"
    config = TrainConfig(features_dir=str(features), output_dir=str(root / "out"), checkpoint_dir=str(root / "ckpt"),
                         task="classification", model=MODEL,
                         training=TrainingSpec(epochs=EPOCHS, batch_size=BATCH, learning_rate=1e-3, seed=0,
                                               threads_per_proc=1, log_every_steps=1, timeout_s=600,
                                               launcher="docker" if docker else "local", nodes=2 if docker else 1,
                                               nproc=1 if docker else 2))
    launcher: Launcher = DockerGangLauncher() if docker else LocalTorchrunLauncher()
    watcher = _FirstStep()
    relay = logging.getLogger("kiln.tasks.launch.docker_gang" if docker else "kiln.tasks.launch.torchrun")
    relay.addHandler(watcher)
    try:
        started = time.monotonic()
        launcher.launch(config, nproc=config.training.nproc, workdir=root / "work", allocation=GANG if docker else None)
    finally:
        relay.removeHandler(watcher)
    assert watcher.at is not None, "the first step's log line never arrived"
    metrics = json.loads((root / "out" / METRICS_FILE).read_text())
    assert metrics["world_size"] == 2 and len({c["sha256"] for c in metrics["param_checksums"]}) == 1
    first_step, mean = watcher.at - started, steady_samples_per_s(metrics["history"], ROWS)
    best = max(h["train/samples_per_s"] for h in metrics["history"][1:])
    print(f"{kind}: first step after {first_step:.2f} s; after the first epoch {best:.0f} samples/s in the best "
          f"epoch, {mean:.0f} on average", flush=True)
    return first_step, best


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kiln.tasks.launch.torchrun").setLevel(logging.INFO)  # the relayed lines reach the handler
    logging.getLogger("kiln.tasks.launch.docker_gang").setLevel(logging.INFO)
    logging.getLogger().handlers[0].setLevel(logging.WARNING)  # but are not printed
    runs: dict[str, list[tuple[float, float]]] = {"local": [], "docker": []}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        features = write_synthetic_features(Path(tmp) / "features", rows=ROWS, dim=DIM, n_classes=CLASSES)
        for pair in range(PAIRS):
            for kind in ("local", "docker") if pair % 2 == 0 else ("docker", "local"):
                runs[kind].append(measure(kind, features, Path(tmp) / f"{kind}{pair}"))
    start = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
    steady = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
    ratio = statistics.median(d[1] / c[1] for d, c in zip(runs["docker"], runs["local"], strict=True))
    overhead = start["docker"] - start["local"]
    print(f"start overhead: docker {start['docker']:.2f} s - local {start['local']:.2f} s = {overhead:+.2f} s "
          f"(target <= {START_TARGET_S:g} s: {'met' if overhead <= START_TARGET_S else 'NOT met'})", flush=True)
    emit("docker_launch", steady["docker"], "samples/s",
         f"local torchrun, 2 ranks x 1 thread (first step: docker {overhead:+.1f} s over local's "
         f"{start['local']:.1f} s, target <= +{START_TARGET_S:g} s)", steady["local"], ">= 0.97", ratio=ratio)


if __name__ == "__main__":
    main()
