"""A run's Optuna study on a real SQLite file (and PostgreSQL): trials driven as separate tasks would drive them
(each opening the study by name, two at once), pruning, a restart in a new process, retried tasks, failed trials,
trials whose process died, and the plots."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from kiln.tasks.pools.store import LeaseStore
from kiln.tasks.spec import PipelineSpec, parse_spec
from kiln.tasks.tuning import (
    TuningError,
    apply_values,
    fail,
    finish,
    heartbeat,
    open_storage,
    open_study,
    open_trial,
    prune,
    report,
    study_name,
    study_outcome,
    suggest,
    trial_values,
    write_plots,
)
from kiln.tasks.tuning.study import ERROR_ATTR, INDEX_ATTR

EPOCHS = 5
RUN_ID = "manual__2026-12-07T06:00:00+00:00"


def _spec(**tuning: Any) -> PipelineSpec:
    return parse_spec({
        "name": "penguins", "source": {"uri": "/data/x.csv"}, "target": "y", "task": "classification",
        "training": {"epochs": EPOCHS, "seed": 3},
        "tuning": {"space": {"training.learning_rate": {"type": "log_uniform", "low": 1.0e-4, "high": 1.0},
                             "model.hidden_sizes": {"type": "categorical", "choices": [[8], [16, 8], [32, 16]]}},
                   "trials": 6, "parallel": 2, **tuning}}, "penguins.yaml")


def _quality(spec: PipelineSpec) -> float:
    """A cheap objective of the trial's spec: best at learning rate 1e-2, a little better with wider layers."""
    return 0.9 - abs(math.log10(spec.training.learning_rate) + 2) / 5 + 0.01 * len(spec.model.hidden_sizes)


def _task(spec: PipelineSpec, url: str, index: int, started: threading.Barrier | None = None) -> dict[str, Any]:
    """One trial task: open the study by name, train (per-epoch accuracy rising to the spec's quality), tell."""
    study = open_study(spec, RUN_ID, open_storage(url))
    trial = open_trial(study, index)
    if started is not None:
        started.wait(timeout=60)  # both trials of a round are RUNNING at once
    values = suggest(trial, spec.tuning.space)
    quality = _quality(apply_values(spec, values))
    for epoch in range(1, EPOCHS + 1):
        if report(trial, quality * epoch / EPOCHS, epoch):
            prune(trial)
            return {"index": index, "number": trial.number, "values": values, "state": "PRUNED"}
    finish(trial, quality)
    return {"index": index, "number": trial.number, "values": values, "state": "COMPLETE", "value": quality}


def _run_rounds(spec: PipelineSpec, url: str, indexes: list[int]) -> list[dict[str, Any]]:
    """The tasks in rounds of ``parallel`` at once, each in its own thread with its own storage connection."""
    results = []
    parallel = spec.tuning.parallel
    with ThreadPoolExecutor(parallel) as pool:
        for start in range(0, len(indexes), parallel):
            batch = indexes[start:start + parallel]
            barrier = threading.Barrier(len(batch))
            results += list(pool.map(lambda i, b=barrier: _task(spec, url, i, b), batch))
    return results


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'pools.db'}"


def test_six_trials_two_at_once_prune_and_find_the_best(tmp_path: Path) -> None:
    spec, url = _spec(), _url(tmp_path)
    results = _run_rounds(spec, url, list(range(6)))

    study = optuna.load_study(study_name="penguins/" + RUN_ID, storage=url)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3, 4, 5]
    assert sorted(t.user_attrs[INDEX_ATTR] for t in trials) == [0, 1, 2, 3, 4, 5]
    assert {r["number"]: r["state"] for r in results} == {t.number: t.state.name for t in trials}
    assert any(t.state == TrialState.PRUNED for t in trials), [(t.number, t.state, t.params) for t in trials]
    # The trials of one round drew different values (each task seeds its own draws).
    assert len({json.dumps(r["values"], sort_keys=True) for r in results}) == 6

    outcome = study_outcome(study)
    complete = [r for r in results if r["state"] == "COMPLETE"]
    best = max(complete, key=lambda r: r["value"])
    assert (outcome.best_number, outcome.direction) == (best["number"], "maximize")
    assert outcome.best_value == pytest.approx(best["value"])
    assert trial_values(study.best_trial, spec.tuning.space) == best["values"]
    assert outcome.states.get("PRUNED", 0) >= 1 and sum(outcome.states.values()) == 6
    assert study.user_attrs["kiln_metric"] == "val/accuracy"

    written = write_plots(study, tmp_path / "plots")
    assert [p.name for p in written] == ["optimization_history.png", "param_importances.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


RESTART = """
import json, sys
from kiln.tasks.spec import parse_spec
from kiln.tasks.tuning import finish, open_storage, open_study, open_trial, suggest
spec = parse_spec(json.loads(sys.argv[1]), "penguins.yaml")
study = open_study(spec, sys.argv[3], open_storage(sys.argv[2]))
out = []
for index in (2, 3):
    trial = open_trial(study, index)
    values = suggest(trial, spec.tuning.space)
    finish(trial, 0.5 + index / 10)
    out.append({"index": index, "number": trial.number, "values": values})
print(json.dumps(out))
"""


def test_restart_continues_the_study_and_a_retried_index_gets_its_trial_back(tmp_path: Path) -> None:
    spec, url = _spec(), _url(tmp_path)
    first = _run_rounds(spec, url, [0, 1])
    study = open_study(spec, RUN_ID, open_storage(url))
    killed = open_trial(study, 2)  # the task of index 2 dies before it tells anything
    killed_values = suggest(killed, spec.tuning.space)
    report(killed, 0.1, 1)

    # The run restarts: a new process opens the study by name and runs the tasks of indexes 2 and 3.
    out = subprocess.run([sys.executable, "-c", RESTART, json.dumps(spec.model_dump(mode="json")), url, RUN_ID],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    second = json.loads(out.strip().splitlines()[-1])
    assert second[0] == {"index": 2, "number": killed.number, "values": killed_values}

    trials = open_study(spec, RUN_ID, open_storage(url)).get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    for r in first:  # the finished trials are kept as they were
        kept = trials[r["number"]]
        assert (kept.state.name, kept.user_attrs[INDEX_ATTR]) == (r["state"], r["index"])
    assert trials[killed.number].intermediate_values == {1: 0.1}
    assert trials[killed.number].value == pytest.approx(0.7)

    # Index 2 retried once more after its trial finished: a new trial, never a repeated number.
    again = open_trial(open_study(spec, RUN_ID, open_storage(url)), 2)
    assert again.number == 4 and again.number not in {t.number for t in trials}


def test_a_failed_trial_is_recorded_and_the_study_goes_on(tmp_path: Path) -> None:
    spec, url = _spec(pruner="none"), _url(tmp_path)
    study = open_study(spec, RUN_ID, open_storage(url))
    broken = open_trial(study, 0)
    suggest(broken, spec.tuning.space)
    try:
        raise RuntimeError("CUDA out of memory in trial 0")
    except RuntimeError as exc:
        failed = fail(broken, exc)
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs[ERROR_ATTR] == "RuntimeError: CUDA out of memory in trial 0"

    good = _task(spec, url, 1)
    assert good["state"] == "COMPLETE" and good["number"] == 1
    outcome = study_outcome(study)
    assert (outcome.best_number, outcome.states) == (1, {"COMPLETE": 1, "FAIL": 1})
    diverged = open_trial(study, 2)
    assert finish(diverged, float("nan")).state == TrialState.FAIL


def test_a_study_whose_trials_all_fail_raises_the_first_error(tmp_path: Path) -> None:
    spec, url = _spec(), _url(tmp_path)
    study = open_study(spec, RUN_ID, open_storage(url))
    for index in range(3):
        fail(open_trial(study, index), ValueError(f"bad batch {index}"))
    with pytest.raises(TuningError) as exc:
        study_outcome(study)
    assert exc.value.first_error == "trial 0: ValueError: bad batch 0"
    assert "all 3 trials failed" in str(exc.value) and study_name("penguins", RUN_ID) in str(exc.value)


def test_a_trial_whose_process_died_is_failed_and_its_values_retried(tmp_path: Path) -> None:
    spec, url = _spec(), _url(tmp_path)
    study = open_study(spec, RUN_ID, open_storage(url, heartbeat_s=1, grace_s=1))
    dead = open_trial(study, 0)
    dead_values = suggest(dead, spec.tuning.space)
    time.sleep(2.5)  # past the grace period without a heartbeat (SQLite's clock counts whole seconds)

    retry = open_trial(study, 1)
    assert study.get_trials()[dead.number].state == TrialState.FAIL
    assert retry.number == 1 and suggest(retry, spec.tuning.space) == dead_values
    assert retry.user_attrs[INDEX_ATTR] == 1


def test_a_live_trial_keeps_its_heartbeat_through_a_long_epoch(tmp_path: Path) -> None:
    spec, url = _spec(), _url(tmp_path)
    study = open_study(spec, RUN_ID, open_storage(url, heartbeat_s=1, grace_s=2))
    live = open_trial(study, 0)
    with heartbeat(live):
        time.sleep(3.5)  # an epoch longer than the grace period
        other = open_trial(open_study(spec, RUN_ID, open_storage(url, heartbeat_s=1, grace_s=2)), 1)
    assert study.get_trials()[live.number].state == TrialState.RUNNING
    assert other.number == 1
    assert finish(live, 0.5).state == TrialState.COMPLETE


def test_a_preempted_trial_waiting_for_devices_is_kept_alive_by_its_task(tmp_path: Path) -> None:
    """The beat a preempted trial's task records while it waits deferred (``beat_running``): the trial of its
    index only, so another process opening trials meanwhile does not take it for dead."""
    from kiln.tasks.tuning.study import beat_running

    spec, url = _spec(), _url(tmp_path)
    storage = open_storage(url, heartbeat_s=1, grace_s=2)
    study = open_study(spec, RUN_ID, storage)
    waiting, unattended = open_trial(study, 0), open_trial(study, 1)
    name = study_name(spec.name, RUN_ID)
    for _ in range(4):  # 3.5 s: past the grace period
        assert beat_running(storage, name, 0) == waiting.number
        time.sleep(0.9)
    open_trial(study, 2)  # fails the stale trials first
    states = {t.number: t.state for t in study.get_trials()}
    assert states[waiting.number] == TrialState.RUNNING and states[unattended.number] == TrialState.FAIL
    assert beat_running(storage, name, 7) is None and beat_running(storage, "no/such-study", 0) is None


def test_the_storage_is_the_lease_stores_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_POOLS_DB_URL", _url(tmp_path))
    LeaseStore.from_settings().close()  # the lease store's tables first, as on a platform already running
    study = open_study(_spec(), RUN_ID)
    assert optuna.study.get_all_study_names(_url(tmp_path)) == [study.study_name]
    with LeaseStore.from_settings() as store:  # and the store still opens beside Optuna's tables
        assert store.url == _url(tmp_path)


def test_open_study_needs_a_tuning_section_and_takes_the_direction(tmp_path: Path) -> None:
    plain = parse_spec({"name": "p", "source": {"uri": "/d.csv"}, "target": "y", "task": "regression"}, "p.yaml")
    with pytest.raises(ValueError, match="has no tuning section"):
        open_study(plain, RUN_ID, _url(tmp_path))
    spec = parse_spec({**plain.model_dump(mode="json"), "tuning": {"space": {
        "model.dropout": {"type": "uniform", "low": 0.0, "high": 0.5}}, "sampler": "random", "pruner": "hyperband"}},
        "p.yaml")
    study = open_study(spec, RUN_ID, _url(tmp_path))
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    assert isinstance(study.pruner, optuna.pruners.HyperbandPruner)
    with pytest.raises(ValueError, match="negative"):
        open_trial(study, -1)


@pytest.mark.postgres
def test_study_on_postgresql(postgres_url: str) -> None:
    spec = _spec(trials=4)
    results = _run_rounds(spec, postgres_url, [0, 1, 2, 3])
    study = open_study(spec, RUN_ID, open_storage(postgres_url))
    assert sorted(t.number for t in study.get_trials()) == [0, 1, 2, 3]
    assert study_outcome(study).best_number in {r["number"] for r in results if r["state"] == "COMPLETE"}


def test_a_metric_line_is_found_behind_any_prefix_and_nothing_else_is_one() -> None:
    from kiln.tasks.training.job import METRIC_LINE, parse_metric_line

    line = f'[n0] 2026-12-07 09:30:02,510 rank0 INFO {METRIC_LINE} {{"step": 3, "value": 0.9142857142857143}}'
    assert parse_metric_line(line) == (3, 0.9142857142857143)
    assert parse_metric_line(f"[default0]:{METRIC_LINE} " + '{"step": 1, "value": 2}') == (1, 2.0)
    for other in ("step 3 metrics: val/accuracy 0.9143", f"{METRIC_LINE} {{not json", f"{METRIC_LINE} {{}}",
                  f'{METRIC_LINE} {{"step": "x", "value": 1}}', ""):
        assert parse_metric_line(other) is None, other


def test_a_trials_lease_is_preemptible_below_train_and_capped_at_the_runs_trials_at_once() -> None:
    from kiln.tasks.pipeline.tuned_run import trial_request
    from kiln.tasks.pools.inventory import Inventory, Team

    spec = _spec().with_overrides({"tuning_parallel": 1})
    inventory = Inventory(pools={}, teams={"default": Team("default", 5)}, source="test")
    request = trial_request(spec, "penguins/manual__1", inventory)
    assert (request.priority, request.preemptible) == (4, True)
    assert (request.group, request.group_limit) == ("study:penguins/manual__1", 1)
    assert trial_request(spec, inventory=inventory).group_limit is None  # in-process: one trial at a time anyway
