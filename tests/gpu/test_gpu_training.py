"""The GPU path on a real CUDA GPU: discovery, a GPU leased from a pool, NCCL, bf16 autocast, resume.

Skipped where ``torch.cuda.is_available()`` is false (``conftest.py``), which includes the CI machine; run it on
a machine with a GPU with ``pytest -m gpu``. Nothing here is mocked: the pool is this machine as
``discover_local`` sees it (``nvidia-smi``), the jobs run under torchrun with the leased ``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from synthetic import write_features

from kiln.tasks.launch.base import LOG_FILE, TrainingFailedError
from kiln.tasks.launch.torchrun import LocalTorchrunLauncher
from kiln.tasks.pools.allocation import Allocation, LeaseRequest, Owner
from kiln.tasks.pools.discovery import discover_gpus
from kiln.tasks.pools.inventory import LOCAL_POOL, discover_local
from kiln.tasks.pools.store import LeaseStore
from kiln.tasks.spec import ModelSpec, TrainingSpec
from kiln.tasks.training.job import METRICS_FILE, TrainConfig

pytestmark = [pytest.mark.gpu, pytest.mark.integration]

EPOCHS = 6
KILL_AFTER_EPOCH = 2


@pytest.fixture
def store(tmp_path: Path):
    with LeaseStore(f"sqlite:///{tmp_path / 'pools.db'}", discover_local()) as s:
        yield s


def lease(store: LeaseStore, gpus: int) -> Allocation:
    allocation = store.try_acquire(LeaseRequest(pool=LOCAL_POOL, gpus=gpus, cpus=2),
                                   Owner(host="gpu-test", pid=os.getpid()))
    assert allocation is not None, f"the local pool could not grant {gpus} GPU(s)"
    return allocation


def make_config(root: Path, features: Path, **training) -> TrainConfig:
    settings = {"epochs": 4, "batch_size": 64, "learning_rate": 3e-3, "seed": 5, "log_every_steps": 1000,
                "timeout_s": 300, **training}
    return TrainConfig(features_dir=str(features), output_dir=str(root / "out"), checkpoint_dir=str(root / "ckpt"),
                       task="classification", model=ModelSpec(hidden_sizes=[128, 64], dropout=0.1),
                       training=TrainingSpec(**settings))


def metrics_of(config: TrainConfig) -> dict:
    return json.loads((Path(config.output_dir) / METRICS_FILE).read_text())


def test_discovery_lists_every_gpu_torch_sees():
    gpus = discover_gpus()
    if "CUDA_VISIBLE_DEVICES" not in os.environ:
        assert len(gpus) == torch.cuda.device_count()
    assert gpus, "nvidia-smi listed no GPU on a machine where CUDA is available"
    for gpu in gpus:
        assert gpu.id.startswith("GPU-"), f"a GPU is leased by UUID, got {gpu.id!r}"
        assert gpu.memory > 1 << 30, f"{gpu.id}: {gpu.memory} bytes of memory"


def test_leased_gpu_trains_on_cuda_with_nccl_and_bf16(tmp_path, store, caplog):
    caplog.set_level("INFO", logger="kiln.tasks.launch.base")
    features = write_features(tmp_path / "features", n=8000, d=8, n_classes=3, seed=2)
    config = make_config(tmp_path, features)
    allocation = lease(store, gpus=1)
    try:
        LocalTorchrunLauncher().launch(config, nproc=1, workdir=tmp_path / "work", allocation=allocation)
    finally:
        store.release(allocation.lease_id)

    gpu_id = allocation.master.cuda_visible_devices()
    assert f"GPUs [{gpu_id}]" in caplog.text, "the job must run with the leased GPU's id in CUDA_VISIBLE_DEVICES"
    metrics = metrics_of(config)
    assert metrics["device"] == "cuda" and metrics["visible_gpus"] == 1
    assert metrics["backend"] == "nccl" and metrics["amp"] == "bf16"
    assert metrics["device_name"] == next(g.model for g in discover_gpus() if g.id == gpu_id)
    losses = [h["train/loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0] * 0.6, f"loss did not fall under bf16 autocast: {losses}"
    assert metrics["final"]["val/accuracy"] > 0.85


def test_a_lease_of_no_gpu_hides_the_gpus(tmp_path, store):
    features = write_features(tmp_path / "features", n=1000, d=4, seed=3)
    config = make_config(tmp_path, features, epochs=1)
    allocation = lease(store, gpus=0)
    try:
        LocalTorchrunLauncher().launch(config, nproc=1, workdir=tmp_path / "work", allocation=allocation)
    finally:
        store.release(allocation.lease_id)
    metrics = metrics_of(config)
    assert (metrics["device"], metrics["visible_gpus"], metrics["backend"]) == ("cpu", 0, "gloo")


def test_gpu_job_killed_mid_training_resumes_with_identical_weights(tmp_path, store):
    """SIGKILL the rank after epoch 2's checkpoint; the retry resumes there and ends with the weights of an
    uninterrupted run (cuBLAS is run-to-run deterministic on one GPU for the same shapes)."""
    features = write_features(tmp_path / "features", n=60000, d=16, n_classes=3, seed=4)
    interrupted = make_config(tmp_path / "interrupted", features, epochs=EPOCHS, batch_size=32)
    allocation = lease(store, gpus=1)
    try:
        launcher = LocalTorchrunLauncher()
        errors: list[BaseException] = []

        def first_try() -> None:
            try:
                launcher.launch(interrupted, nproc=1, workdir=tmp_path / "interrupted" / "try1",
                                allocation=allocation)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=first_try)
        thread.start()
        ckpt = Path(interrupted.checkpoint_dir) / f"epoch_{KILL_AFTER_EPOCH:04d}.pt"
        deadline = time.monotonic() + 120
        while not ckpt.exists():
            assert time.monotonic() < deadline, f"{ckpt} never appeared"
            time.sleep(0.01)
        assert launcher.pid is not None
        worker = next(p for p in psutil.Process(launcher.pid).children() if p.environ().get("RANK") == "0")
        worker.send_signal(signal.SIGKILL)
        thread.join(timeout=60)
        assert errors and isinstance(errors[0], TrainingFailedError)
        saved = sorted(int(p.stem.split("_")[1]) for p in Path(interrupted.checkpoint_dir).glob("epoch_*.pt"))
        assert KILL_AFTER_EPOCH <= saved[-1] < EPOCHS, f"the kill came too late to test a resume: {saved}"

        LocalTorchrunLauncher().launch(interrupted, nproc=1, workdir=tmp_path / "interrupted" / "try2",
                                       allocation=allocation)
        log = (tmp_path / "interrupted" / "try2" / LOG_FILE).read_text()
        assert f"resuming from checkpoint epoch {saved[-1]}" in log

        straight = make_config(tmp_path / "straight", features, epochs=EPOCHS, batch_size=32)
        LocalTorchrunLauncher().launch(straight, nproc=1, workdir=tmp_path / "straight" / "work",
                                       allocation=allocation)
    finally:
        store.release(allocation.lease_id)

    resumed, uninterrupted = (torch.load(Path(c.output_dir) / "model.pt", weights_only=False)["state_dict"]
                              for c in (interrupted, straight))
    assert metrics_of(interrupted)["device"] == "cuda"
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), f"{name} differs between the resumed and uninterrupted runs"


def test_more_ranks_than_leased_gpus_fails_with_the_fix(tmp_path, store):
    features = write_features(tmp_path / "features", n=400, d=4, seed=6)
    config = make_config(tmp_path, features, epochs=1)
    allocation = lease(store, gpus=1)
    try:
        with pytest.raises(TrainingFailedError) as failed:
            LocalTorchrunLauncher().launch(config, nproc=2, workdir=tmp_path / "work", allocation=allocation)
    finally:
        store.release(allocation.lease_id)
    assert "only 1 GPU(s): lease one GPU per rank" in failed.value.log_tail
