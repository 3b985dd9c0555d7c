"""The train step in-process (world_size 1) and the launcher's process handling, on tiny CPU data."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from synthetic import write_features

from kiln.tasks.launch.base import LOG_FILE, TrainingFailedError, get_launcher
from kiln.tasks.launch.torchrun import LocalTorchrunLauncher
from kiln.tasks.spec import ModelSpec, TrainingSpec
from kiln.tasks.training.job import METRICS_FILE, TrainConfig
from kiln.tasks.training.loop import param_checksum, run_train
from kiln.tasks.training.networks import load_model, predict


def make_config(tmp_path: Path, features: Path, *, name: str = "run", task: str = "classification",
                model: ModelSpec | None = None, **training) -> TrainConfig:
    settings = {"epochs": 4, "batch_size": 16, "learning_rate": 5e-3, "seed": 7, "log_every_steps": 5, **training}
    return TrainConfig(features_dir=str(features), output_dir=str(tmp_path / name / "out"),
                       checkpoint_dir=str(tmp_path / name / "ckpt"), task=task,  # type: ignore[arg-type]
                       model=model or ModelSpec(hidden_sizes=[16]), training=TrainingSpec(**settings))


def metrics_of(config: TrainConfig) -> dict:
    return json.loads((Path(config.output_dir) / METRICS_FILE).read_text())


def checksum_of(config: TrainConfig) -> str:
    return param_checksum(load_model(config.output_dir).module)["sha256"]


@pytest.fixture
def features(tmp_path: Path) -> Path:
    return write_features(tmp_path / "features")


def test_loss_decreases_and_outputs_are_written(tmp_path, features, caplog):
    config = make_config(tmp_path, features, epochs=6)
    with caplog.at_level(logging.INFO, logger="kiln.tasks.training"):
        result = run_train(config)
    history = metrics_of(config)["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert history[-1]["train/loss"] < 0.6 * history[0]["train/loss"]
    assert result.metrics["val/accuracy"] > 0.9
    assert result.epochs_run == 6 and result.resumed_from_epoch is None and result.world_size == 1
    assert result.samples_per_s and result.samples_per_s > 0
    assert any("epoch 1/6 step 5/25 loss" in r.getMessage() and "ms/step" in r.getMessage() for r in caplog.records)
    loaded = load_model(config.output_dir)
    assert loaded.meta["epochs_run"] == 6 and loaded.meta["world_size"] == 1
    assert TrainConfig.from_json(loaded.meta["train_config"]) == config
    assert predict(loaded, np.zeros((3, 4), np.float32)).shape == (3, 2)


def test_same_seed_gives_identical_weights(tmp_path, features):
    first, second = (make_config(tmp_path, features, name=n, model=ModelSpec(hidden_sizes=[16], dropout=0.2))
                     for n in ("a", "b"))
    run_train(first)
    run_train(second)
    assert checksum_of(first) == checksum_of(second)
    other_seed = make_config(tmp_path, features, name="c", seed=8, model=first.model)
    run_train(other_seed)
    assert checksum_of(other_seed) != checksum_of(first)


def test_checkpoints_are_written_atomically_each_epoch_and_only_the_last_two_kept(tmp_path, features, monkeypatch):
    from kiln.tasks.training import checkpoints as checkpoint

    written, atomic_write = [], checkpoint.atomic_write_bytes

    def recording_write(path, data):
        written.append(Path(path).name)
        return atomic_write(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", recording_write)
    config = make_config(tmp_path, features, epochs=4)
    run_train(config)
    assert written == ["epoch_0001.pt", "epoch_0002.pt", "epoch_0003.pt", "epoch_0004.pt"]
    assert sorted(p.name for p in Path(config.checkpoint_dir).glob("epoch_*")) == ["epoch_0003.pt", "epoch_0004.pt"]
    ckpt = torch.load(Path(config.checkpoint_dir) / "epoch_0004.pt", weights_only=True)
    assert ckpt["epoch"] == 4 and ckpt["fingerprint"] == config.fingerprint()
    assert {"state", "rng_states", "history"} <= set(ckpt)
    assert {"model_state", "optimizer_state"} == set(ckpt["state"])
    assert [h["epoch"] for h in ckpt["history"]] == [1, 2, 3, 4]


def test_extending_a_finished_job_resumes_and_matches_an_uninterrupted_run(tmp_path, features, caplog):
    model = ModelSpec(hidden_sizes=[16], dropout=0.2)  # dropout: the RNG state must survive the resume too
    straight = make_config(tmp_path, features, name="straight", epochs=4, model=model)
    run_train(straight)
    short = make_config(tmp_path, features, name="resumed", epochs=2, model=model)
    run_train(short)
    extended = dataclasses.replace(short, training=straight.training)
    with caplog.at_level(logging.INFO, logger="kiln.tasks.training"):
        result = run_train(extended)
    assert "resuming from checkpoint epoch 2" in caplog.text
    assert result.resumed_from_epoch == 2 and result.epochs_run == 4
    assert [h["epoch"] for h in metrics_of(extended)["history"]] == [1, 2, 3, 4]
    assert checksum_of(extended) == checksum_of(straight)


def test_a_finished_job_rerun_only_rewrites_its_outputs(tmp_path, features):
    config = make_config(tmp_path, features, epochs=2)
    run_train(config)
    before = checksum_of(config)
    (Path(config.output_dir) / "model.pt").unlink()
    result = run_train(config)
    assert result.resumed_from_epoch == 2 and result.epochs_run == 2 and result.samples_per_s is None
    assert checksum_of(config) == before
    assert [h["epoch"] for h in metrics_of(config)["history"]] == [1, 2]


def test_checkpoint_with_another_fingerprint_is_ignored(tmp_path, features, caplog):
    config = make_config(tmp_path, features, epochs=2)
    run_train(config)
    changed = dataclasses.replace(config, training=config.training.model_copy(update={"learning_rate": 1e-3}))
    assert changed.fingerprint() != config.fingerprint()
    with caplog.at_level(logging.WARNING, logger="kiln.tasks.training"):
        result = run_train(changed)
    assert result.resumed_from_epoch is None
    assert "epoch_0002.pt: written for another config or data" in caplog.text


def test_corrupt_checkpoint_is_skipped_for_an_older_one(tmp_path, features, caplog):
    config = make_config(tmp_path, features, epochs=2)
    run_train(config)
    newest = Path(config.checkpoint_dir) / "epoch_0002.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # a torn file, as a full disk would leave it
    with caplog.at_level(logging.WARNING, logger="kiln.tasks.training"):
        result = run_train(dataclasses.replace(config, training=config.training.model_copy(update={"epochs": 3})))
    assert result.resumed_from_epoch == 1 and result.epochs_run == 3
    assert f"skipping checkpoint {newest}: unreadable" in caplog.text


def test_regression(tmp_path):
    features = write_features(tmp_path / "features", task="regression")
    config = make_config(tmp_path, features, task="regression", epochs=8, learning_rate=2e-2)
    result = run_train(config)
    history = metrics_of(config)["history"]
    assert history[-1]["val/rmse"] < 0.5 * history[0]["val/rmse"]
    assert set(result.metrics) == {"train/loss", "train/samples_per_s", "val/loss", "val/rmse"}
    assert predict(load_model(config.output_dir), np.zeros((5, 4), np.float32)).shape == (5,)


def test_cnn_on_tiny_images(tmp_path):
    features = write_features(tmp_path / "features", d=16)
    model = ModelSpec(type="cnn", image_shape=(4, 4), channels=[4], hidden_sizes=[8])
    result = run_train(make_config(tmp_path, features, model=model, epochs=2))
    assert result.epochs_run == 2
    assert type(load_model(Path(result.model_file).parent).module).__name__ == "SmallCNN"


def test_config_json_round_trip_and_fingerprint_scope(tmp_path, features):
    config = make_config(tmp_path, features, model=ModelSpec(type="cnn", image_shape=(2, 2)))
    again = TrainConfig.from_json(config.to_json())
    assert again == config and again.fingerprint() == config.fingerprint()
    longer = dataclasses.replace(config, training=config.training.model_copy(update={"epochs": 50}),
                                 output_dir="elsewhere", mlflow_run_id="abc")
    assert longer.fingerprint() == config.fingerprint()
    assert dataclasses.replace(config, task="regression").fingerprint() != config.fingerprint()


@pytest.mark.parametrize(("change", "message"), [
    ({"task": "nonsense"}, "TrainConfig.task must be one of classification, regression"),
    ({"output_dir": ""}, "TrainConfig.output_dir must be a non-empty path"),
], ids=["bad-task", "empty-output-dir"])
def test_invalid_config_is_rejected(tmp_path, features, change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(make_config(tmp_path, features), **change)


def test_features_for_another_task_are_rejected(tmp_path, features):
    with pytest.raises(ValueError, match="features in .* are for task 'classification'"):
        run_train(make_config(tmp_path, features, task="regression"))


def test_labels_outside_the_classes_are_rejected(tmp_path):
    features = write_features(tmp_path / "features")
    (features / "feature_spec.json").write_text(json.dumps({"input_dim": 4, "n_classes": 1, "task": "classification"}))
    with pytest.raises(ValueError, match="n_classes >= 2"):
        run_train(make_config(tmp_path, features))
    df = pd.read_parquet(features / "train.parquet")
    df.loc[3, "target"] = 5
    df.to_parquet(features / "train.parquet")
    (features / "feature_spec.json").write_text(json.dumps({"input_dim": 4, "n_classes": 2, "task": "classification"}))
    with pytest.raises(ValueError, match=r"target values \[5\] are outside the class indices 0..1"):
        run_train(make_config(tmp_path, features))


def test_mlflow_params_once_and_metrics_per_epoch(tmp_path, features):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("train-test")).info.run_id
    config = dataclasses.replace(make_config(tmp_path, features, epochs=2), mlflow_tracking_uri=uri,
                                 mlflow_run_id=run_id)
    run_train(config)
    run_train(dataclasses.replace(config, training=config.training.model_copy(update={"epochs": 3})))
    run = client.get_run(run_id)
    assert run.data.params["training.epochs"] == "2"  # logged on the first start only
    assert [m.step for m in client.get_metric_history(run_id, "val/accuracy")] == [1, 2, 3]
    assert {"train/loss", "val/loss", "val/accuracy"} <= set(run.data.metrics)


@pytest.mark.parametrize("valid", [True, False], ids=["trains", "fails-with-exit-1"])
def test_cli_runs_as_a_single_process_without_torchrun(tmp_path, features, valid):
    config = make_config(tmp_path, features if valid else tmp_path / "missing", epochs=1)
    config_file = tmp_path / "cfg.json"
    config_file.write_text(config.to_json())
    proc = subprocess.run([sys.executable, "-m", "kiln.tasks.training", "--config", str(config_file)],
                          capture_output=True, text=True, timeout=120)
    if valid:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "rank0 INFO epoch 1/1 done" in proc.stdout
        assert metrics_of(config)["world_size"] == 1
    else:
        assert proc.returncode == 1
        assert "training failed on rank 0" in proc.stdout and "FileNotFoundError" in proc.stdout


def test_unknown_launcher_lists_the_available_ones():
    assert isinstance(get_launcher("local"), LocalTorchrunLauncher)
    with pytest.raises(ValueError, match="unknown launcher 'k8s'; available: docker, local"):
        get_launcher("k8s")


class _StubbornLauncher(LocalTorchrunLauncher):
    """Runs a job that ignores SIGTERM instead of torchrun, to exercise the kill path without torch start-up."""

    def command(self, config_path: Path, nproc: int, max_restarts: int = 0,
                shutdown_timeout_s: int = 30) -> list[str]:
        code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
                "time.sleep(600)")
        return [sys.executable, "-c", code]


def test_terminate_from_another_thread_kills_a_job_that_ignores_sigterm(tmp_path, features):
    launcher = _StubbornLauncher(kill_grace_s=1.0)
    errors: list[BaseException] = []

    def launch() -> None:
        try:
            launcher.launch(make_config(tmp_path, features), nproc=1, workdir=tmp_path / "work")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=launch)
    thread.start()
    log_file = tmp_path / "work" / LOG_FILE
    deadline = time.monotonic() + 20
    while not (log_file.exists() and "ready" in log_file.read_text()):
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.02)
    started = time.monotonic()
    launcher.terminate()
    launcher.terminate()  # a second call is harmless
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert time.monotonic() - started < 5
    assert isinstance(errors[0], TrainingFailedError) and "was terminated" in str(errors[0])
    assert errors[0].exit_code == -9 and "ready" in errors[0].log_tail
