"""A pipeline's own training loop under torchrun (2 ranks, gloo): a loop that crashes on one rank fails the job
with the rank named in the log, and a loop that never checkpoints starts over on the retry, saying so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from synthetic import write_features

from kiln.tasks.bundle.program import load_program
from kiln.tasks.launch.base import LOG_FILE, TrainingFailedError
from kiln.tasks.launch.torchrun import LocalTorchrunLauncher
from kiln.tasks.spec import ModelSpec, TrainingSpec
from kiln.tasks.training.job import TrainConfig

pytestmark = pytest.mark.integration

CODE = Path(__file__).resolve().parents[1] / "user_code"


def test_a_loop_that_never_checkpoints_starts_over_after_a_crash_on_one_rank(tmp_path):
    features = write_features(tmp_path / "features", n=200)
    config = TrainConfig(
        features_dir=str(features), output_dir=str(tmp_path / "out"), checkpoint_dir=str(tmp_path / "ckpt"),
        task="classification", model=ModelSpec(type="custom", factory="tabular_net:build", options={"width": 8}),
        training=TrainingSpec(epochs=2, batch_size=16, seed=3, timeout_s=120,
                              entrypoint="user_loops.py:train_without_checkpoints",
                              params={"fail_once": str(tmp_path / "crashed")}),
        code_dir=str(CODE))

    with pytest.raises(TrainingFailedError) as info:
        LocalTorchrunLauncher().launch(config, nproc=2, workdir=tmp_path / "try1")
    assert "training failed on rank 1" in info.value.log_tail
    assert "RuntimeError: out of disk space while writing scratch data" in info.value.log_tail
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

    LocalTorchrunLauncher().launch(config, nproc=2, workdir=tmp_path / "try2")
    log = (tmp_path / "try2" / LOG_FILE).read_text()
    assert "an earlier try of this job ran but left no checkpoint" in log
    assert "training starts over from the beginning (the loop saved no checkpoint" in log
    program = load_program(tmp_path / "out")
    assert program.meta["entrypoint"] == "user_loops.py:train_without_checkpoints"
    assert program.predict(np.zeros((2, 4), np.float32)).shape == (2, 2)
