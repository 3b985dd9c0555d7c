"""The training API in one process (world_size 1): a custom network in kiln's loop, a pipeline's own loop that
checkpoints through the API, what the job does with what a loop hands back (checked, exported, or an error
naming the spec field and the fix, with nothing written), and a SIGTERM that stops a loop at its next checkpoint."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import write_features

from kiln.tasks.bundle.program import ModelExportError, load_program
from kiln.tasks.spec import ModelSpec, TrainingSpec
from kiln.tasks.training import api
from kiln.tasks.training.api import JobPreemptedError, TrainContext
from kiln.tasks.training.job import METRICS_FILE, TrainConfig
from kiln.tasks.training.networks import load_model
from kiln.tasks.training.runner import run_train
from kiln.tasks.training.user_code import UserCodeError

CODE = Path(__file__).resolve().parents[1] / "user_code"


def make_config(tmp_path: Path, features: Path, *, name: str = "run", factory: str = "tabular_net:build",
                entrypoint: str | None = None, code_dir: Path = CODE, options: dict | None = None,
                **training) -> TrainConfig:
    settings = {"epochs": 2, "batch_size": 16, "learning_rate": 5e-3, "seed": 7, "log_every_steps": 1000,
                "entrypoint": entrypoint, **training}
    return TrainConfig(features_dir=str(features), output_dir=str(tmp_path / name / "out"),
                       checkpoint_dir=str(tmp_path / name / "ckpt"), task="classification",
                       model=ModelSpec(type="custom", factory=factory,
                                       options={"width": 8} if options is None else options),
                       training=TrainingSpec(**settings), code_dir=str(code_dir))


@pytest.fixture
def features(tmp_path: Path) -> Path:
    return write_features(tmp_path / "features", n=200)


def test_custom_network_in_kilns_loop_is_trained_and_exported(tmp_path, features):
    config = make_config(tmp_path, features)
    result = run_train(config)
    out = Path(config.output_dir)
    assert result.epochs_run == 2 and result.metrics["val/accuracy"] > 0.5
    program = load_program(out)  # no factory needed: the program holds the graph
    assert program.meta["factory"] == "tabular_net:build" and program.meta["entrypoint"] is None
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    probs = program.predict(x)
    assert probs.shape == (5, 2) and np.allclose(probs.sum(axis=1), 1, atol=1e-6)
    state = torch.load(out / "model.pt", weights_only=False)
    assert state["meta"]["factory"] == "tabular_net:build" and not state["meta"]["rebuildable"]
    with pytest.raises(ValueError, match=r"built by the pipeline's own code .* exported program \(model.pt2\)"):
        load_model(out)


def test_own_loop_resumes_from_its_checkpoint_to_the_weights_of_a_straight_run(tmp_path, features, caplog):
    loop = "user_loops.py:train_with_checkpoints"
    straight = make_config(tmp_path, features, name="straight", entrypoint=loop, epochs=3)
    run_train(straight)
    short = make_config(tmp_path, features, name="resumed", entrypoint=loop, epochs=2)
    run_train(short)
    with caplog.at_level(logging.INFO, logger="kiln.tasks.training"):
        result = run_train(dataclasses.replace(short, training=straight.training))
    assert "resuming from checkpoint epoch 2" in caplog.text
    assert result.resumed_from_epoch == 2 and result.epochs_run == 3
    metrics = [json.loads((Path(c.output_dir) / METRICS_FILE).read_text()) for c in (straight, short)]
    assert [h["epoch"] for h in metrics[1]["history"]] == [1, 2, 3]  # the logged history came back with the state
    assert metrics[1]["param_checksums"] == metrics[0]["param_checksums"]
    assert metrics[1]["final"] == metrics[0]["final"] and set(metrics[1]["final"]) == {"train/loss_sum"}
    assert load_program(straight.output_dir).meta["entrypoint"] == loop


@pytest.mark.parametrize(("entrypoint", "factory", "error", "expected"), [
    ("broken_code:loop_returns_none", "tabular_net:build", UserCodeError,
     ["training.entrypoint 'broken_code:loop_returns_none'", "returned NoneType on rank 0",
      "return TrainedModel(module, example_input)"]),
    ("broken_code:loop_returns_wrong_width", "tabular_net:build", UserCodeError,
     ["training.entrypoint 'broken_code:loop_returns_wrong_width'", "needs float [4, 2]"]),
    (None, "broken_code:branchy", ModelExportError,
     ["model.factory 'broken_code:branchy' cannot be exported with torch.export", "broken_code.py",
      "no Python branches or loops on tensor values"]),
], ids=["loop-returns-none", "loop-returns-wrong-width", "not-exportable"])
def test_a_model_that_cannot_be_handed_over_fails_the_job_and_writes_nothing(tmp_path, features, entrypoint,
                                                                              factory, error, expected):
    config = make_config(tmp_path, features, entrypoint=entrypoint, factory=factory, epochs=1,
                         options={} if factory.startswith("broken_code") else None)
    with pytest.raises(error) as info:
        run_train(config)
    for part in expected:
        assert part in str(info.value)
    assert not list(Path(config.output_dir).glob("*"))  # no model.pt, model.pt2 or metrics


def test_changed_code_changes_the_fingerprint(tmp_path, features):
    code = shutil.copytree(CODE, tmp_path / "code")
    config = make_config(tmp_path, features, code_dir=code)
    before = config.fingerprint()
    (code / "tabular_net.py").write_text((code / "tabular_net.py").read_text() + "\n# tuned\n")
    assert config.fingerprint() != before
    assert dataclasses.replace(config, code_hash="abc").fingerprint() != config.fingerprint()
    params = dataclasses.replace(config, training=config.training.model_copy(update={"params": {"warmup": 3}}))
    assert params.fingerprint() != config.fingerprint()


def test_requirements_travel_in_the_config_and_change_the_fingerprint(tmp_path, features):
    config = dataclasses.replace(make_config(tmp_path, features), requirements=["tabulate==0.9.0"])  # type: ignore[arg-type]
    assert config.requirements == ("tabulate==0.9.0",)
    assert TrainConfig.from_json(config.to_json()) == config
    assert dataclasses.replace(config, requirements=("tabulate==0.8.10",)).fingerprint() != config.fingerprint()


@pytest.fixture
def sigterm_asks_to_stop(monkeypatch):
    """SIGTERM handled as a training process handles it; the flag and the previous handler come back afterwards."""
    monkeypatch.setattr(api, "_stop_requested", False)
    previous = signal.signal(signal.SIGTERM, api.request_stop)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_a_sigterm_saves_the_next_checkpoint_then_stops_the_loop(tmp_path, features, sigterm_asks_to_stop):
    config = make_config(tmp_path, features)
    ctx = TrainContext(config, rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    ctx.save_checkpoint({"step": torch.tensor(1)}, epoch=1)
    assert not ctx.stop_requested

    signal.raise_signal(signal.SIGTERM)  # as a launcher's preempt() sends it
    assert ctx.stop_requested
    with pytest.raises(JobPreemptedError) as info:
        try:
            ctx.save_checkpoint({"step": torch.tensor(2)}, epoch=2)
        except Exception:  # noqa: BLE001 - a loop's catch-all must not swallow the stop
            pytest.fail("JobPreemptedError was caught by `except Exception`")
    assert info.value.epoch == 2
    resumed = ctx.load_checkpoint()  # written before the stop, and complete
    assert resumed is not None and resumed.epoch == 2 and int(resumed.state["step"]) == 2


def test_kilns_loop_stops_at_its_first_checkpoint_after_a_sigterm_and_exports_nothing(tmp_path, features,
                                                                                      sigterm_asks_to_stop):
    config = make_config(tmp_path, features, epochs=3)
    signal.raise_signal(signal.SIGTERM)
    with pytest.raises(JobPreemptedError) as info:
        run_train(config)
    assert info.value.epoch == 1
    assert (Path(config.checkpoint_dir) / "epoch_0001.pt").is_file()
    assert not Path(config.output_dir).exists() or not any(Path(config.output_dir).iterdir())
