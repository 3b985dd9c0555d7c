"""torchrun with 2 ranks on gloo through LocalTorchrunLauncher: synchronised training, and failures that end fast.

The failures are real ones, not injected through a test-only switch in the training code:
- a crash: the checkpoint folder cannot be created (a file is in the way), so rank 0 raises at start-up while
  rank 1 already waits in the collective that shares the resume point;
- a hang: the newest checkpoint is a FIFO nobody writes to, so rank 0 blocks in ``open()`` forever, the way a
  read from a dead network mount does, and rank 1 waits for it in a collective; only the launcher's timeout (or
  ``terminate()``) can end that job.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from synthetic import write_features

from kiln.tasks.launch.base import TrainingFailedError, TrainingTimeoutError
from kiln.tasks.launch.torchrun import LocalTorchrunLauncher
from kiln.tasks.spec import ModelSpec, TrainingSpec
from kiln.tasks.training.job import METRICS_FILE, TrainConfig
from kiln.tasks.training.networks import load_model, predict

pytestmark = pytest.mark.integration



def make_config(tmp_path: Path, features: Path, *, checkpoint_dir: Path | None = None, **training) -> TrainConfig:
    settings = {"epochs": 3, "batch_size": 16, "learning_rate": 5e-3, "seed": 3, "log_every_steps": 10, **training}
    return TrainConfig(features_dir=str(features), output_dir=str(tmp_path / "out"),
                       checkpoint_dir=str(checkpoint_dir or tmp_path / "ckpt"), task="classification",
                       model=ModelSpec(hidden_sizes=[32, 16], dropout=0.1), training=TrainingSpec(**settings))


def hang_rank0_on_checkpoint(checkpoint_dir: Path) -> None:
    checkpoint_dir.mkdir(parents=True)
    os.mkfifo(checkpoint_dir / "epoch_0001.pt")


def assert_group_gone(pgid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)


def test_two_ranks_train_with_parameters_in_sync(tmp_path):
    config = make_config(tmp_path, write_features(tmp_path / "features", n=600))
    launcher = LocalTorchrunLauncher()
    result = launcher.launch(config, nproc=2, workdir=tmp_path / "work")

    assert result.exit_code == 0
    assert "epoch 1/3 step 10/19 loss" in result.log_tail  # 600 rows / 2 ranks / batch 16 = 19 steps
    metrics = json.loads((tmp_path / "out" / METRICS_FILE).read_text())
    assert metrics["world_size"] == 2
    checksums = metrics["param_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1], "DDP replicas diverged"
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert metrics["final"]["val/accuracy"] > 0.8
    model = load_model(config.output_dir)
    assert model.meta["world_size"] == 2 and model.meta["epochs_run"] == 3
    assert predict(model, np.zeros((2, 4), np.float32)).shape == (2, 2)


def test_a_crashing_rank_fails_the_launch_quickly_with_its_traceback(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    config = make_config(tmp_path, write_features(tmp_path / "features", n=600), checkpoint_dir=blocker / "ckpt",
                         timeout_s=600)
    launcher = LocalTorchrunLauncher()
    started = time.monotonic()
    with pytest.raises(TrainingFailedError) as info:
        launcher.launch(config, nproc=2, workdir=tmp_path / "work")
    assert time.monotonic() - started < 30, "the surviving rank was not stopped promptly"
    assert not isinstance(info.value, TrainingTimeoutError)
    assert info.value.exit_code != 0
    assert "Traceback (most recent call last)" in info.value.log_tail
    assert "not-a-folder" in info.value.log_tail and "not-a-folder" in str(info.value)
    assert launcher.pid is not None
    assert_group_gone(launcher.pid)


def test_a_hung_job_is_killed_at_its_timeout(tmp_path):
    hang_rank0_on_checkpoint(tmp_path / "ckpt")
    # The smallest timeout TrainingSpec allows. Rank 1's collective timeout is as long, but it starts only after
    # the ranks have started up, so the launcher's timeout always comes first.
    config = make_config(tmp_path, write_features(tmp_path / "features", n=600), timeout_s=10)
    launcher = LocalTorchrunLauncher(kill_grace_s=3)
    started = time.monotonic()
    with pytest.raises(TrainingTimeoutError) as info:
        launcher.launch(config, nproc=2, workdir=tmp_path / "work")
    elapsed = time.monotonic() - started
    assert 10 <= elapsed < 10 + 3 + 5
    assert "ran past its 10 s timeout" in str(info.value)
    assert "training failed on rank" not in info.value.log_tail  # killed, not ended by a collective timeout
    assert launcher.pid is not None
    assert_group_gone(launcher.pid)


def test_terminate_from_another_thread_stops_every_rank(tmp_path):
    features = write_features(tmp_path / "features", n=600)
    hang_rank0_on_checkpoint(tmp_path / "ckpt")  # only terminate() ends this job
    launcher = LocalTorchrunLauncher(kill_grace_s=3)
    errors: list[BaseException] = []

    def launch() -> None:
        try:
            launcher.launch(make_config(tmp_path, features, timeout_s=600), nproc=2, workdir=tmp_path / "work")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=launch)
    thread.start()
    deadline = time.monotonic() + 30
    while not (launcher.pid and len(psutil.Process(launcher.pid).children()) == 2):  # both ranks running
        assert time.monotonic() < deadline, "torchrun never started its workers"
        time.sleep(0.05)
    workers = psutil.Process(launcher.pid).children()
    launcher.terminate()  # as an Airflow operator's on_kill does
    thread.join(timeout=15)
    assert not thread.is_alive()
    assert isinstance(errors[0], TrainingFailedError) and "was terminated" in str(errors[0])
    launcher.terminate()  # safe again after the job is gone
    assert not any(w.is_running() for w in workers)
    assert_group_gone(launcher.pid)
