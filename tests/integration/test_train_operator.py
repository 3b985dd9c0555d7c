"""TrainOperator: ``on_kill`` stops the whole torchrun job and publishes nothing; the retry resumes."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SPEC = str(Path(__file__).resolve().parents[2] / "dags" / "pipelines" / "penguins_species.yaml")


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def test_on_kill_stops_training_and_retry_resumes(tmp_path: Path) -> None:
    from operators.train import TrainOperator
    from tasks import pipeline
    from tasks.launch import TrainingFailedError

    run_id = "manual__operator_kill"
    long_run = {"epochs": 10_000}
    ctx = pipeline.make_context(SPEC, run_id, long_run)
    for step in ("ingest", "validate", "clean", "build_features"):
        getattr(pipeline, step)(ctx)
    checkpoints = ctx.store.scratch(ctx.key(pipeline.CHECKPOINTS))

    op = TrainOperator(task_id="train", spec_path=SPEC)
    outcome: dict[str, BaseException] = {}

    def execute() -> None:
        try:
            op.execute({"run_id": run_id, "params": long_run})
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    worker = threading.Thread(target=execute)
    worker.start()
    _wait_for(lambda: len(list(checkpoints.glob("epoch_*.pt"))) >= 2, 120, "two epoch checkpoints")
    pgid = op._launcher.pid
    op.on_kill()
    op.on_kill()  # a second kill (Airflow may send one) is harmless
    worker.join(60)
    assert not worker.is_alive()

    assert isinstance(outcome.get("error"), TrainingFailedError)
    with pytest.raises(ProcessLookupError):  # torchrun and both ranks are gone
        os.killpg(pgid, 0)
    assert not ctx.store.exists(ctx.key("train"))  # nothing half-written was published
    assert not [p for p in Path(ctx.store.path(ctx.key("ingest"))).parent.iterdir() if p.name.startswith(".tmp")]

    # The retry (same run) continues from the newest complete checkpoint.
    done = max(int(p.stem.split("_")[1]) for p in checkpoints.glob("epoch_*.pt"))
    retry = {"epochs": done + 2}
    result = TrainOperator(task_id="train", spec_path=SPEC).execute({"run_id": run_id, "params": retry})
    assert result["resumed_from_epoch"] == done
    from tasks.artifacts import read_json

    history = read_json(ctx.input_dir("train") / "train_metrics.json")["history"]
    assert [h["epoch"] for h in history] == list(range(1, done + 3))
