"""TrainOperator: ``on_kill`` stops the whole torchrun job, releases its lease and publishes nothing; the retry
resumes from the last checkpoint."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.integration

SPEC = str(Path(__file__).resolve().parents[2] / "dags" / "pipelines" / "penguins_species.yaml")


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def _context(run_id: str, params: dict, try_number: int) -> dict:
    ti = SimpleNamespace(dag_id="penguins_species", run_id=run_id, task_id="train", try_number=try_number)
    return {"run_id": run_id, "params": params, "ti": ti}


def _live_leases() -> list:
    from kiln.tasks.pools.store import LeaseStore

    store = LeaseStore.from_settings()
    try:
        return [lease for lease in store.leases() if lease.state in ("waiting", "granted")]
    finally:
        store.close()


def test_on_kill_stops_training_and_retry_resumes(tmp_path: Path) -> None:
    from kiln.operators.train import TrainOperator
    from kiln.tasks.launch.base import TrainingFailedError
    from kiln.tasks.pipeline import keys
    from kiln.tasks.pipeline.context import make_context
    from kiln.tasks.pipeline.runner import run_all

    run_id = "manual__operator_kill"
    long_run = {"epochs": 10_000}
    ctx = make_context(SPEC, run_id, long_run)
    run_all(ctx, until=keys.BUILD_FEATURES)
    checkpoints = ctx.store.scratch(ctx.key(keys.CHECKPOINTS))

    op = TrainOperator(task_id="train", spec_path=SPEC)
    outcome: dict[str, BaseException] = {}

    def execute() -> None:
        try:
            op.execute(_context(run_id, long_run, 1))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    worker = threading.Thread(target=execute)
    worker.start()
    _wait_for(lambda: len(list(checkpoints.glob("epoch_*.pt"))) >= 2, 120, "two epoch checkpoints")
    [held] = _live_leases()  # the job runs on a lease of the local pool, owned by this task try
    assert (held.owner.task_id, held.owner.try_number, held.state) == ("train", 1, "granted")
    pgid = op._launcher.pid
    op.on_kill()
    op.on_kill()  # a second kill (Airflow may send one) is harmless
    worker.join(60)
    assert not worker.is_alive()

    assert isinstance(outcome.get("error"), TrainingFailedError)
    assert _live_leases() == []  # the lease was released, not left to expire
    with pytest.raises(ProcessLookupError):  # torchrun and both ranks are gone
        os.killpg(pgid, 0)
    assert not ctx.store.exists(ctx.key("train"))  # nothing half-written was published
    assert not [p for p in Path(ctx.store.path(ctx.key("ingest"))).parent.iterdir() if p.name.startswith(".tmp")]

    # The retry (same run) continues from the newest complete checkpoint.
    done = max(int(p.stem.split("_")[1]) for p in checkpoints.glob("epoch_*.pt"))
    retry = {"epochs": done + 2}
    result = TrainOperator(task_id="train", spec_path=SPEC).execute(_context(run_id, retry, 2))
    assert _live_leases() == []
    assert result["resumed_from_epoch"] == done
    from kiln.tasks.storage.artifacts import read_json

    history = read_json(ctx.input_dir("train") / "train_metrics.json")["history"]
    assert [h["epoch"] for h in history] == list(range(1, done + 3))
