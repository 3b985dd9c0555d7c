"""Hyper-parameter search (the spec's ``tuning:`` section): the search space as Optuna distributions, a run's
study in the lease store's database, its trials opened and told from separate processes, and its plots. Plain
Python: the DAG maps one task per trial over these functions."""

from kiln.tasks.tuning.plots import write_plots
from kiln.tasks.tuning.space import apply_values, distributions, suggest, trial_values
from kiln.tasks.tuning.study import (
    StudyOutcome,
    TuningError,
    best_trial,
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
)

__all__ = [
    "StudyOutcome", "TuningError", "apply_values", "best_trial", "distributions", "fail", "finish", "heartbeat",
    "open_storage", "open_study", "open_trial", "prune", "report", "study_name", "study_outcome", "suggest",
    "trial_values", "write_plots",
]
