"""A pipeline run's Optuna study in the lease store's database, and its trials driven by ask and tell from separate
processes (each trial one task: a retried task gets its own trial back).

The study is named ``<pipeline>/<run id>`` and opened with ``load_if_exists``, so a restarted run continues it: the
finished trials are kept and trial numbers never repeat (the storage numbers them). A trial's process records a
heartbeat (:func:`heartbeat`, and every :func:`report`); a RUNNING trial without one for :data:`GRACE_S` is failed
the next time any process opens a trial or reads the outcome, and queued again with the same values
(:data:`MAX_RETRIES` times).
"""

from __future__ import annotations

import logging
import math
import threading
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import FrozenTrial, Trial, TrialState
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from kiln.tasks.settings import get_settings
from kiln.tasks.spec import PipelineSpec

log = logging.getLogger(__name__)

#: Trial user attributes: the task's map index, and the error of a failed trial.
INDEX_ATTR = "kiln_index"
ERROR_ATTR = "kiln_error"
#: A live trial's process records a heartbeat this often (seconds) ...
HEARTBEAT_S = 30
#: ... and a RUNNING trial without one for this long is failed (its process died) and queued again.
GRACE_S = 120
#: Times a trial whose process died is queued again with the same values.
MAX_RETRIES = 2
#: The longest error text kept on a failed trial (the task log holds the whole traceback).
MAX_ERROR_CHARS = 4000
#: Tries at creating the storage (its tables) while other processes may create them.
_CREATE_TRIES = 5


class TuningError(RuntimeError):
    """No trial of a study completed. ``first_error`` is the error of its first failed trial (None: none failed,
    e.g. the study has no finished trial yet)."""

    def __init__(self, study_name: str, message: str, first_error: str | None = None):
        self.study_name = study_name
        self.first_error = first_error
        super().__init__(f"study {study_name!r}: {message}" + (f"; the first error: {first_error}"
                                                               if first_error else ""))


@dataclass(frozen=True)
class StudyOutcome:
    """A study's result: its best trial and how its trials ended."""

    study_name: str
    direction: str
    best_number: int
    best_value: float
    best_params: dict[str, Any]
    """Optuna's stored values (a list choice as its JSON text; :func:`kiln.tasks.tuning.space.trial_values`
    decodes them)."""
    states: dict[str, int] = field(default_factory=dict)
    """Trials per state (``COMPLETE``, ``PRUNED``, ``FAIL``, ``RUNNING``, ``WAITING``)."""


@contextmanager
def _quiet() -> Iterator[None]:
    """Optuna marks the heartbeat API experimental and warns that heartbeats are meant for ``Study.optimize``;
    kiln records them itself (:func:`heartbeat`), so those warnings say nothing here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield


def study_name(pipeline: str, run_id: str) -> str:
    """The study of a pipeline run: ``<pipeline>/<run id>``."""
    return f"{pipeline}/{run_id}"


def open_storage(url: str | None = None, *, heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S) -> RDBStorage:
    """Optuna's RDB storage on ``url`` (default: the lease store's database, ``KILN_POOLS_DB_URL``); creates its
    tables on first use."""
    url = url or get_settings().pools_db_url
    # SQLite: wait for another process's write instead of failing at once; a server: drop connections it closed.
    engine_kwargs: dict[str, Any] = ({"connect_args": {"timeout": 30}} if url.startswith("sqlite")
                                     else {"pool_pre_ping": True})
    for attempt in range(1, _CREATE_TRIES + 1):
        try:
            with _quiet():
                return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s,
                                  grace_period=grace_s,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                                      max_retry=MAX_RETRIES))
        except (OperationalError, ProgrammingError, IntegrityError) as exc:
            # Trials starting at once on a new database race to create Optuna's tables (or stamp their schema
            # version): the loser's next try finds them. Any other database error recurs and is raised.
            if attempt == _CREATE_TRIES:
                raise
            log.info("Optuna's tables were being created by another process (%s); trying again",
                     str(exc.orig).strip().splitlines()[0] if exc.orig else exc)
    raise AssertionError("unreachable")


def _sampler(kind: str, seed: int) -> optuna.samplers.BaseSampler:
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(spec: PipelineSpec) -> optuna.pruners.BasePruner:
    tuning = spec.tuning
    assert tuning is not None
    if tuning.pruner == "none":
        return optuna.pruners.NopPruner()
    if tuning.pruner == "hyperband":
        epochs = tuning.space.get("training.epochs")
        max_epochs = int(epochs.high) if epochs is not None and epochs.high is not None else spec.training.epochs
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(max_epochs, 2), reduction_factor=3)
    # The first round of trials has nothing to compare with; epoch 1 is too noisy to stop a trial on.
    return optuna.pruners.MedianPruner(n_startup_trials=min(5, max(tuning.parallel, tuning.trials // 4)),
                                       n_warmup_steps=2)


def open_study(spec: PipelineSpec, run_id: str, storage: str | RDBStorage | None = None) -> optuna.Study:
    """The run's study, created on first use and loaded after (by any process, and after a restart).

    Args:
        spec: the pipeline spec; its ``tuning`` section sets the direction, sampler, pruner and seed.
        run_id: the pipeline run's id.
        storage: a storage URL or storage (default: the lease store's database).

    Raises:
        ValueError: the spec has no ``tuning`` section.
    """
    tuning = spec.tuning
    if tuning is None:
        raise ValueError(f"pipeline {spec.name!r} has no tuning section: add tuning.space to search")
    store = storage if isinstance(storage, RDBStorage) else open_storage(storage)
    name = study_name(spec.name, run_id)
    seed = tuning.study_seed(spec)
    study = optuna.create_study(storage=store, study_name=name, direction=tuning.direction(spec),
                                sampler=_sampler(tuning.sampler, seed), pruner=_pruner(spec), load_if_exists=True)
    wanted = {"kiln_pipeline": spec.name, "kiln_run_id": run_id, "kiln_metric": tuning.metric(spec),
              "kiln_trials": tuning.trials, "kiln_sampler": tuning.sampler, "kiln_seed": seed}
    for key, value in wanted.items():
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)
    finished = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
    log.info("study %s: %s %s, %d of %d trials finished, sampler %s, pruner %s", name, tuning.direction(spec),
             tuning.metric(spec), finished, tuning.trials, tuning.sampler, tuning.pruner)
    return study


def _trial_seed(base: int, index: int, attempt: int) -> int:
    """A seed per trial task: processes opening trials at once draw different values, reproducibly."""
    return int(np.random.SeedSequence([base, index, attempt]).generate_state(1)[0])


def open_trial(study: optuna.Study, index: int) -> Trial:
    """The trial of task ``index`` (its map index): its RUNNING trial again when the task is retried, else a new
    one (a queued retry of a dead trial first). Trial numbers never repeat.

    Raises:
        ValueError: a negative index.
    """
    if index < 0:
        raise ValueError(f"index {index} is negative: trials are indexed 0, 1, ...")
    with _quiet():
        fail_stale_trials(study)
    mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(INDEX_ATTR) == index]
    running = [t for t in mine if t.state == TrialState.RUNNING]
    if running:
        trial = Trial(study, running[-1]._trial_id)
        _beat(study, trial)
        log.info("study %s: trial %d (index %d) resumed with %s", study.study_name, trial.number, index,
                 trial.params)
        return trial
    attrs = study.user_attrs
    if "kiln_seed" in attrs:
        study.sampler = _sampler(str(attrs.get("kiln_sampler")), _trial_seed(int(attrs["kiln_seed"]), index, len(mine)))
    with _quiet():
        trial = study.ask()
    trial.set_user_attr(INDEX_ATTR, index)
    _beat(study, trial)
    log.info("study %s: trial %d opened for index %d%s", study.study_name, trial.number, index,
             f" (retry of a trial whose process died, values {trial.params})" if trial.params else "")
    return trial


def _heartbeat_interval(study: optuna.Study) -> int | None:
    """The storage's heartbeat interval (Optuna's cache in front of the RDB storage passes heartbeats through)."""
    get = getattr(study._storage, "get_heartbeat_interval", None)
    return get() if get is not None else None


def _beat(study: optuna.Study, trial: Trial) -> None:
    if _heartbeat_interval(study) is not None:
        study._storage.record_heartbeat(trial._trial_id)  # type: ignore[attr-defined]


def beat_running(storage: RDBStorage, name: str, index: int) -> int | None:
    """Record the heartbeat of study ``name``'s RUNNING trial of task ``index`` (a preempted trial's task beats it
    while it waits for devices again), if there is one.

    Returns:
        The trial's number, or None (no such study or RUNNING trial).
    """
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return None
    for t in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get(INDEX_ATTR) == index:
            with _quiet():
                storage.record_heartbeat(t._trial_id)
            return t.number
    return None


@contextmanager
def heartbeat(trial: Trial) -> Iterator[None]:
    """Record the trial's heartbeat every ``HEARTBEAT_S`` while the block runs (a trial trains longer than the
    grace period between two reports)."""
    interval = _heartbeat_interval(trial.study)
    if interval is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            _beat(trial.study, trial)

    thread = threading.Thread(target=beat, name=f"trial-{trial.number}-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def report(trial: Trial, value: float, epoch: int) -> bool:
    """Report the objective's value after ``epoch`` (1, 2, ...).

    Returns:
        True: the pruner stops this trial now (then call :func:`prune`).
    """
    trial.report(float(value), step=epoch)
    _beat(trial.study, trial)
    stop = trial.should_prune()
    log.info("study %s: trial %d epoch %d value %.6g%s", trial.study.study_name, trial.number, epoch, value,
             ", pruned" if stop else "")
    return stop


def finish(trial: Trial, value: float) -> FrozenTrial:
    """Record the trial's objective value (COMPLETE); a value that is not finite fails the trial instead.

    Raises:
        ValueError: the trial is already finished.
    """
    study = trial.study
    if not math.isfinite(value):
        return fail(trial, ValueError(f"the objective value is {value}: the training diverged"))
    frozen = study.tell(trial, float(value))
    best = _best_or_none(study)
    log.info("study %s: trial %d finished with %.6g (best: trial %s, %s)", study.study_name, trial.number, value,
             best.number if best else "-", f"{best.value:.6g}" if best and best.value is not None else "-")
    return frozen


def fail(trial: Trial, error: BaseException | str) -> FrozenTrial:
    """Record the trial as FAIL with ``error`` (kept as the user attribute ``kiln_error``); the study goes on. A
    trial already finished is left as it is."""
    study = trial.study
    text = error if isinstance(error, str) else "".join(traceback.format_exception_only(error)).strip()
    current = study._storage.get_trial(trial._trial_id)
    if current.state.is_finished():
        log.warning("study %s: trial %d is already %s; not failing it (%s)", study.study_name, trial.number,
                    current.state.name, text)
        return current
    trial.set_user_attr(ERROR_ATTR, text[:MAX_ERROR_CHARS])
    frozen = study.tell(trial, state=TrialState.FAIL)
    log.warning("study %s: trial %d failed: %s", study.study_name, trial.number, text)
    return frozen


def prune(trial: Trial) -> FrozenTrial:
    """Record the trial as PRUNED (its value: the last one reported)."""
    frozen = trial.study.tell(trial, state=TrialState.PRUNED)
    log.info("study %s: trial %d pruned at epoch %s", trial.study.study_name, trial.number, frozen.last_step)
    return frozen


def _best_or_none(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return study.best_trial if complete else None


def best_trial(study: optuna.Study) -> FrozenTrial:
    """The best COMPLETE trial.

    Raises:
        TuningError: no trial completed (with the first failed trial's error).
    """
    best = _best_or_none(study)
    if best is None:
        _raise_no_trial(study)
    assert best is not None
    return best


def _raise_no_trial(study: optuna.Study) -> None:
    trials = study.get_trials(deepcopy=False)
    failed = sorted((t for t in trials if t.state == TrialState.FAIL), key=lambda t: t.number)
    if failed:
        first = failed[0]
        error = first.user_attrs.get(ERROR_ATTR) or "its process stopped (no heartbeat within the grace period)"
        message = (f"all {len(trials)} trials failed" if len(failed) == len(trials)
                   else f"no trial completed ({len(failed)} of {len(trials)} failed)")
        raise TuningError(study.study_name, message, f"trial {first.number}: {error}")
    raise TuningError(study.study_name, f"no trial completed ({len(trials)} trials: "
                      f"{', '.join(sorted({t.state.name for t in trials})) or 'none'})")


def study_outcome(study: optuna.Study) -> StudyOutcome:
    """The study's best trial and its trials' states (stale RUNNING trials are failed first).

    Raises:
        TuningError: no trial completed; every trial failed: with the first error.
    """
    with _quiet():
        fail_stale_trials(study)
    best = best_trial(study)
    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    assert best.value is not None
    outcome = StudyOutcome(study_name=study.study_name, direction=study.direction.name.lower(),
                           best_number=best.number, best_value=best.value, best_params=dict(best.params),
                           states=states)
    log.info("study %s: best trial %d (%.6g) of %s", study.study_name, best.number, best.value,
             ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())))
    return outcome
