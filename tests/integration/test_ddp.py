"""torchrun with 2 ranks on gloo through LocalTorchrunLauncher: synchronised training, failures that end fast, and
preemption (the job checkpoints and exits, or is killed at its grace deadline, and resumes where it stopped).

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
import re
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from synthetic import write_features

from kiln.tasks.launch.base import LOG_FILE, TrainingFailedError, TrainingPreemptedError, TrainingTimeoutError
from kiln.tasks.launch.torchrun import LocalTorchrunLauncher
from kiln.tasks.spec import ModelSpec, TrainingSpec
from kiln.tasks.training.job import METRICS_FILE, TrainConfig
from kiln.tasks.training.networks import load_model, predict

pytestmark = pytest.mark.integration

CODE = Path(__file__).resolve().parents[1] / "user_code"


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
    # the ranks have started up, so the launcher's timeout always comes first (it may fire during the kill grace,
    # in which a rank runs on to its next checkpoint).
    config = make_config(tmp_path, write_features(tmp_path / "features", n=600), timeout_s=10)
    launcher = LocalTorchrunLauncher(kill_grace_s=3)
    started = time.monotonic()
    with pytest.raises(TrainingTimeoutError) as info:
        launcher.launch(config, nproc=2, workdir=tmp_path / "work")
    elapsed = time.monotonic() - started
    assert 10 <= elapsed < 10 + 3 + 5
    assert "ran past its 10 s timeout" in str(info.value)
    assert "training failed on rank 0" not in info.value.log_tail  # the hung rank was killed
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


def preempt_when(launcher: LocalTorchrunLauncher, text: str, grace_s: float) -> threading.Thread:
    """Preempt the launcher's job, from a thread of its own, once an output line contains ``text``."""
    preempting = threading.Thread(target=launcher.preempt, args=(grace_s,), name="preempt")

    def hook(line: str) -> None:
        if text in line and preempting.ident is None:
            preempting.start()

    launcher.watch_output(hook)
    return preempting


def test_a_preempted_job_checkpoints_exits_and_resumes_to_the_weights_of_a_straight_run(tmp_path):
    features = write_features(tmp_path / "features", n=600)
    config = make_config(tmp_path, features, epochs=30)
    launcher = LocalTorchrunLauncher()
    preempting = preempt_when(launcher, "epoch 1/30 done", grace_s=30)
    with pytest.raises(TrainingPreemptedError) as info:
        launcher.launch(config, nproc=2, workdir=tmp_path / "work")
    preempting.join()

    assert info.value.killed is False and info.value.grace_s == 30
    assert "it checkpointed and exited within its 30 s grace period" in str(info.value)
    saved = re.search(r"preempted: checkpoint of epoch (\d+) saved; exiting with 75", info.value.log_tail)
    assert saved, "rank 0 did not report the checkpoint it saved"
    epoch = int(saved[1])
    assert 1 <= epoch < 30, f"it stopped at epoch {epoch}, not mid-run"
    assert (tmp_path / "ckpt" / f"epoch_{epoch:04d}.pt").is_file(), "the checkpoint it reported is not on disk"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert_group_gone(launcher.pid)
    with pytest.raises(TrainingPreemptedError, match="was preempted before it started"):
        launcher.launch(config, nproc=2, workdir=tmp_path / "refused")

    LocalTorchrunLauncher().launch(config, nproc=2, workdir=tmp_path / "resumed")
    assert f"resuming from checkpoint epoch {epoch} " in (tmp_path / "resumed" / LOG_FILE).read_text()
    straight = make_config(tmp_path / "straight", features, epochs=30)
    LocalTorchrunLauncher().launch(straight, nproc=2, workdir=tmp_path / "straight" / "work")
    resumed_metrics, straight_metrics = (json.loads((Path(c.output_dir) / METRICS_FILE).read_text())
                                         for c in (config, straight))
    assert resumed_metrics["resumed_from_epoch"] == epoch
    assert [h["epoch"] for h in resumed_metrics["history"]] == list(range(1, 31))
    assert resumed_metrics["param_checksums"] == straight_metrics["param_checksums"]


def test_a_preempted_job_that_ignores_sigterm_is_killed_at_its_grace_deadline(tmp_path):
    config = TrainConfig(
        features_dir=str(write_features(tmp_path / "features", n=200)), output_dir=str(tmp_path / "out"),
        checkpoint_dir=str(tmp_path / "ckpt"), task="classification", model=ModelSpec(hidden_sizes=[8]),
        training=TrainingSpec(epochs=1, timeout_s=300, entrypoint="user_loops.py:train_forever"), code_dir=str(CODE))
    launcher = LocalTorchrunLauncher()
    looping = threading.Event()
    launcher.watch_output(lambda line: looping.set() if "looping until killed" in line else None)
    errors: list[BaseException] = []

    def launch() -> None:
        try:
            launcher.launch(config, nproc=2, workdir=tmp_path / "work")
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    thread = threading.Thread(target=launch)
    thread.start()
    assert looping.wait(timeout=60), "the loop never started"
    assert launcher.pid is not None
    workers = psutil.Process(launcher.pid).children()
    assert len(workers) == 2
    started = time.monotonic()
    launcher.preempt(grace_s=2)
    launcher.preempt(grace_s=2)  # a second call is harmless
    thread.join(timeout=15)
    elapsed = time.monotonic() - started

    assert not thread.is_alive()
    assert 2 <= elapsed < 2 + 8, f"the launch returned {elapsed:.1f} s after the preemption"
    assert isinstance(errors[0], TrainingPreemptedError) and errors[0].killed is True
    assert "did not exit within its 2 s grace period and was killed; it resumes from its last complete checkpoint" \
        in str(errors[0])
    assert not any(w.is_running() for w in workers)
    assert_group_gone(launcher.pid)
