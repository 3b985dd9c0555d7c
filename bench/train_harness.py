"""train_harness: kiln's training harness against plain PyTorch, in two comparisons (``--compare``).

``run-train`` (default): ``kiln.tasks.training.runner.run_train`` (kiln's own loop) in one process against a
minimal plain-PyTorch loop. Same synthetic data (20,000 rows x 32 features, 4 classes), model (MLP 64-32), batch
(64), optimizer (Adam), seed and thread count (1) on both sides. Both time the training loop of each epoch, data
shuffling included; run_train's per-epoch validation, checkpoint and MLflow work happen outside that window, as
they are not part of the training step. The first epoch of each run is warm-up and not counted. The two sides
alternate in 30 short rounds (which one goes first alternates too); value and peer_value are the medians of each
side's per-epoch throughputs, and the ratio is the median of the per-round ratios, so that the speed drift of a
shared 2-core VM (+-20% within a minute) cancels out. Ratio = run_train / plain; target >= 0.95.

``user-loop``: a pipeline's own loop through kiln's training API (``bench/_user_loop.py`` as
``training.entrypoint``, run by the local launcher's command line, ``torchrun -m kiln.tasks.training``) against
the same loop as a plain torchrun script (``bench/_plain_ddp.py``, no kiln). Both: 2 ranks x 1 thread under
``torchrun --standalone`` (gloo, CPU), the same parquet features (20,000 rows x 32, 4 classes), MLP 64-32, per-rank
batch 64, Adam, seed and sharding; both end with bit-identical weights (checked every round). Each side times whole
epochs on rank 0: the training steps, the loss all-reduce and the per-epoch calls a real loop makes (the user loop:
``ctx.log_metrics`` and ``ctx.save_checkpoint``; the plain script: a log line and ``torch.save`` from rank 0). No
MLflow run is attached (``log_metrics`` then only logs its line), so the figure is the API's own cost, not an MLflow
store's. Start-up and kiln's model export after the loop are outside the window.
Whole jobs alternated in rounds were too far apart (~20 s of start-up each) for this VM, where other work moves a
2-rank epoch's speed by +-40% between jobs; so in each of :data:`UL_ROUNDS` rounds both jobs run at once and take
turns epoch by epoch through a turn file (the waiting job sleeps; which side goes first alternates by round), and
each epoch of one side is compared with the same epoch of the other, run next to it. Epoch 1 is warm-up. value and
peer_value are the medians of each side's per-epoch throughputs; the ratio is the median of the per-epoch-pair
ratios. The peer text also gives the ratio expected from the per-call costs alone (median training-step window S
and median per-epoch call costs C: (S + C_plain) / (S + C_api)), which the VM's noise hardly moves. Ratio = API /
plain; target >= 0.97.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd
import torch
from _common import emit, write_synthetic_features

from kiln.tasks.launch.torchrun import LocalTorchrunLauncher
from kiln.tasks.spec import ModelSpec, TrainingSpec
from kiln.tasks.training.job import CONFIG_FILE, METRICS_FILE, TrainConfig
from kiln.tasks.training.networks import build_model
from kiln.tasks.training.runner import run_train

ROWS, DIM, CLASSES, BATCH, EPOCHS, ROUNDS, SEED, LR = 20_000, 32, 4, 64, 3, 30, 0, 1e-3
MODEL = ModelSpec(hidden_sizes=[64, 32])
#: ``user-loop``: rows of the train split, epochs per job (the first is warm-up) and rounds.
UL_ROWS, UL_EPOCHS, UL_ROUNDS, NPROC = 20_000, 31, 3, 2
BENCH = Path(__file__).resolve().parent


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


def compare_run_train() -> None:
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
def _calls_ms(run: dict) -> float:
    """Median milliseconds of an epoch's log + checkpoint calls, after the first epoch."""
    return 1000 * statistics.median(a + b for a, b in zip(run["log_s"][1:], run["checkpoint_s"][1:], strict=True))


def _start(cmd: list[str], root: Path) -> tuple[subprocess.Popen, IO[str]]:
    """Start a torchrun job in a session of its own (so that a failure stops all of it), output to a log file."""
    out = (root / "job.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # as LocalTorchrunLauncher sets them
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True), out


def user_loop_round(features: Path, code_dir: Path, root: Path, api_slot: int) -> dict[str, dict]:
    """Both jobs at once, taking turns epoch by epoch (``api_slot`` 0: the user loop's epoch 1 goes first); each
    side's timings file, with the sha256 of its final weights and its job's wall time."""
    roots = {side: root / side for side in ("api", "plain")}
    for folder in roots.values():
        folder.mkdir(parents=True)
    turn_file = root / "turn"
    turn_file.write_text("0")
    config = TrainConfig(
        features_dir=str(features), output_dir=str(roots["api"] / "out"), checkpoint_dir=str(roots["api"] / "ckpt"),
        task="classification", model=MODEL, code_dir=str(code_dir),
        training=TrainingSpec(epochs=UL_EPOCHS, batch_size=BATCH, learning_rate=LR, seed=SEED, nproc=NPROC,
                              threads_per_proc=1, timeout_s=600, entrypoint="_user_loop:train",
                              params={"timings_file": str(roots["api"] / "timings.json"),
                                      "turn_file": str(turn_file), "turn_slot": api_slot}))
    config_path = roots["api"] / CONFIG_FILE
    config_path.write_text(config.to_json())
    commands = {
        # The launcher's own command line: what the train step runs.
        "api": LocalTorchrunLauncher().command(config_path, NPROC),
        "plain": [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}",
                  str(BENCH / "_plain_ddp.py"), "--features", str(features),
                  "--checkpoint-dir", str(roots["plain"] / "ckpt"), "--timings", str(roots["plain"] / "timings.json"),
                  "--epochs", str(UL_EPOCHS), "--batch-size", str(BATCH), "--learning-rate", str(LR),
                  "--seed", str(SEED), "--threads", "1", "--hidden", ",".join(map(str, MODEL.hidden_sizes)),
                  "--turn-file", str(turn_file), "--turn-slot", str(1 - api_slot)]}
    start = time.monotonic()
    jobs = {side: _start(cmd, roots[side]) for side, cmd in commands.items()}
    job_s, failed = {}, []
    for side, (proc, out) in jobs.items():
        try:
            code = proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            code = None
        job_s[side] = time.monotonic() - start
        out.close()
        if code != 0:
            failed.append(f"{side} job exited {code}:\n{(roots[side] / 'job.log').read_text()[-3000:]}")
            for other, _ in jobs.values():  # the peer would wait for its turn until it timed out
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(other.pid, signal.SIGKILL)
    if failed:
        raise RuntimeError("\n".join(failed))
    runs = {side: {**json.loads((roots[side] / "timings.json").read_text()), "job_s": job_s[side]}
            for side in roots}
    metrics = json.loads((roots["api"] / "out" / METRICS_FILE).read_text())
    runs["api"]["sha256"] = metrics["param_checksums"][0]["sha256"]
    return runs


def compare_user_loop() -> None:
    logging.basicConfig(level=logging.WARNING)
    pairs: dict[str, list[float]] = {"epoch_s": [], "steps_s": []}
    calls: dict[tuple[str, str], list[float]] = {}
    rates: dict[str, list[float]] = {"api": [], "plain": []}
    job_s: dict[str, list[float]] = {"api": [], "plain": []}
    steps_s: list[float] = []  # the training-step windows of both sides (the same code)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        features = write_synthetic_features(Path(tmp) / "features", rows=UL_ROWS, dim=DIM, n_classes=CLASSES)
        code_dir = Path(tmp) / "code"  # the pipeline's code folder: the loop alone, as a pipeline ships it
        code_dir.mkdir()
        shutil.copy(BENCH / "_user_loop.py", code_dir / "_user_loop.py")
        for r in range(UL_ROUNDS):
            runs = user_loop_round(features, code_dir, Path(tmp) / f"round{r}", api_slot=r % 2)
            if runs["api"]["sha256"] != runs["plain"]["sha256"]:
                raise RuntimeError("the user loop and the plain script ended with different weights: they did not "
                                   "run the same training")
            api, plain_ = runs["api"], runs["plain"]
            for key in pairs:  # epoch e of one side against epoch e of the other, run back to back; epoch 1: warm-up
                pairs[key] += [p / a for a, p in zip(api[key][1:], plain_[key][1:], strict=True)]
            for side, run in runs.items():
                rates[side] += [run["samples_per_epoch"] / s for s in run["epoch_s"][1:]]
                steps_s += run["steps_s"][1:]
                job_s[side].append(run["job_s"])
                for key in ("log_s", "checkpoint_s"):
                    calls.setdefault((side, key), []).extend(run[key][1:])
            n = UL_EPOCHS - 1
            print(f"round {r + 1}: API {statistics.median(rates['api'][-n:]):.0f} samples/s, plain "
                  f"{statistics.median(rates['plain'][-n:]):.0f}, ratio {statistics.median(pairs['epoch_s'][-n:]):.3f}"
                  f" (training steps only {statistics.median(pairs['steps_s'][-n:]):.3f}); per-epoch calls: API "
                  f"{_calls_ms(api):.1f} ms, plain {_calls_ms(plain_):.1f} ms", flush=True)

    def ms(side: str, key: str) -> str:
        return f"{statistics.median(calls[side, key]) * 1000:.1f} ms"

    ratio, q = statistics.median(pairs["epoch_s"]), statistics.quantiles(pairs["epoch_s"], n=4)
    step, cost = statistics.median(steps_s), {
        side: statistics.median(calls[side, "log_s"]) + statistics.median(calls[side, "checkpoint_s"])
        for side in ("api", "plain")}
    expected = (step + cost["plain"]) / (step + cost["api"])
    peer = (f"the same loop as a plain torchrun script (no kiln): 2 ranks x 1 thread, gloo, same data, MLP, batch, "
            f"Adam, seed, bit-identical weights; whole epochs incl. the per-epoch log + checkpoint calls, "
            f"{UL_ROUNDS} rounds x {UL_EPOCHS - 1} epoch pairs, the two jobs taking turns epoch by epoch "
            f"(epoch ratios' quartiles {q[0]:.3f}/{q[2]:.3f}; training steps alone: ratio "
            f"{statistics.median(pairs['steps_s']):.3f}; expected from the per-call costs {expected:.3f} at a "
            f"{step * 1000:.0f} ms step window; per epoch ctx.log_metrics {ms('api', 'log_s')} + "
            f"ctx.save_checkpoint {ms('api', 'checkpoint_s')} vs log line {ms('plain', 'log_s')} + torch.save "
            f"{ms('plain', 'checkpoint_s')}, medians; job wall time {statistics.median(job_s['api']):.1f} vs "
            f"{statistics.median(job_s['plain']):.1f} s)")
    emit("train_harness_user_loop", statistics.median(rates["api"]), "samples/s", peer,
         statistics.median(rates["plain"]), ">= 0.97", ratio=ratio)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=("run-train", "user-loop"), default="run-train",
                        help="run-train: kiln's loop in one process vs a plain loop (default); user-loop: a user "
                             "loop through kiln's API vs the same plain torchrun script, 2 ranks")
    args = parser.parse_args()
    compare_user_loop() if args.compare == "user-loop" else compare_run_train()


if __name__ == "__main__":
    main()
