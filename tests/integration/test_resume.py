"""A 2-rank job killed mid-training resumes from its last checkpoint and ends with the weights of a run that was
never interrupted (same seed): checkpoints carry the model, optimizer and every rank's RNG state, and the data
order is a function of (seed, epoch) only; the resumed try exports the model (model.pt2). The same, for a pipeline's
own network and for its own loop checkpointing through the training API, is tested through Airflow (a rank killed,
Airflow's retry resuming) in test_own_code_pipelines.py."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from synthetic import write_features

from kiln.tasks.bundle.program import load_program
from kiln.tasks.launch.base import LOG_FILE, TrainingFailedError
from kiln.tasks.launch.torchrun import LocalTorchrunLauncher
from kiln.tasks.spec import ModelSpec, TrainingSpec
from kiln.tasks.training.job import METRICS_FILE, TrainConfig

pytestmark = pytest.mark.integration

EPOCHS = 5
KILL_AFTER_EPOCH = 2



#: Dropout draws from the RNG, so a resume is bit-identical only if every rank's RNG state is restored.
MODEL = {"hidden_sizes": [64, 32], "dropout": 0.2}


def make_config(root: Path, features: Path) -> TrainConfig:
    return TrainConfig(
        features_dir=str(features), output_dir=str(root / "out"), checkpoint_dir=str(root / "ckpt"),
        task="classification", model=ModelSpec(**MODEL),
        training=TrainingSpec(epochs=EPOCHS, batch_size=8, learning_rate=2e-3, seed=11, log_every_steps=1000,
                              timeout_s=300))  # generous: a busy CI machine ran epochs 10x slower than a quiet one


def kill_rank_when_checkpoint_exists(launcher: LocalTorchrunLauncher, checkpoint: Path, rank: int) -> int:
    """SIGKILL one worker (as the OOM killer would) as soon as ``checkpoint`` appears; returns its pid."""
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert time.monotonic() < deadline, f"{checkpoint} never appeared"
        time.sleep(0.01)
    assert launcher.pid is not None
    worker = next(p for p in psutil.Process(launcher.pid).children() if p.environ().get("RANK") == str(rank))
    worker.send_signal(signal.SIGKILL)
    return worker.pid


def final_state(root: Path) -> dict[str, torch.Tensor]:
    return torch.load(root / "out" / "model.pt", weights_only=False)["state_dict"]


def test_killed_job_resumes_after_its_last_checkpoint_with_identical_final_weights(tmp_path):
    features = write_features(tmp_path / "features", n=2000, d=8, n_classes=3, seed=1)
    interrupted = make_config(tmp_path / "interrupted", features)

    launcher = LocalTorchrunLauncher()
    errors: list[BaseException] = []

    def first_try() -> None:
        try:
            launcher.launch(interrupted, nproc=2, workdir=tmp_path / "interrupted" / "try1")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=first_try)
    thread.start()
    kill_rank_when_checkpoint_exists(launcher, Path(interrupted.checkpoint_dir) / f"epoch_{KILL_AFTER_EPOCH:04d}.pt",
                                     rank=1)
    thread.join(timeout=300)
    assert isinstance(errors[0], TrainingFailedError), "killing a rank must fail the whole job"
    assert not (Path(interrupted.output_dir) / "model.pt").exists()
    saved = sorted(int(p.stem.split("_")[1]) for p in Path(interrupted.checkpoint_dir).glob("epoch_*.pt"))
    last = saved[-1]
    assert KILL_AFTER_EPOCH <= last < EPOCHS, f"the kill came too late to test a resume: checkpoints {saved}"

    # The retry: same config, same checkpoint folder.
    LocalTorchrunLauncher().launch(interrupted, nproc=2, workdir=tmp_path / "interrupted" / "try2")
    assert f"resuming from checkpoint epoch {last}" in (tmp_path / "interrupted" / "try2" / LOG_FILE).read_text()
    metrics = json.loads((Path(interrupted.output_dir) / METRICS_FILE).read_text())
    assert metrics["resumed_from_epoch"] == last
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, EPOCHS + 1))  # contiguous, none repeated

    reference = make_config(tmp_path / "reference", features)
    LocalTorchrunLauncher().launch(reference, nproc=2, workdir=tmp_path / "reference" / "work")
    reference_metrics = json.loads((Path(reference.output_dir) / METRICS_FILE).read_text())
    # Bit-identical, not merely close: CPU kernels are deterministic at a fixed thread count and the resumed run
    # replays exactly the batches and dropout masks the uninterrupted one drew.
    assert metrics["param_checksums"] == reference_metrics["param_checksums"]
    resumed_state, reference_state = final_state(tmp_path / "interrupted"), final_state(tmp_path / "reference")
    assert all(torch.equal(resumed_state[k], reference_state[k]) for k in reference_state)
    assert [h["train/loss"] for h in metrics["history"]] == [h["train/loss"] for h in reference_metrics["history"]]
    program = load_program(interrupted.output_dir)  # exported at the end of the resumed try
    x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    assert np.array_equal(program.predict(x), load_program(reference.output_dir).predict(x))
