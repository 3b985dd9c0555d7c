"""A study's plots, as PNG files for the pipeline run's MLflow run: the optimisation history and the parameter
importances. Drawn with ``optuna.visualization.matplotlib`` (Optuna's default plots need plotly, which kiln does not
install)."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from kiln.tasks.storage.artifacts import atomic_write_bytes

log = logging.getLogger(__name__)

#: The files :func:`write_plots` writes.
HISTORY_PNG = "optimization_history.png"
IMPORTANCES_PNG = "param_importances.png"


def _save(axes: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure = axes.figure
    try:
        figure.set_size_inches(8, 5)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(figure)  # optuna draws through pyplot, which keeps every figure until closed
    return atomic_write_bytes(path, buffer.getvalue())


def write_plots(study: optuna.Study, folder: str | Path, metric: str | None = None) -> list[Path]:
    """Write the optimisation history (with one finished trial or more) and the parameter importances (with two
    COMPLETE trials or more, the least Optuna needs) into ``folder``.

    Returns:
        The files written, in that order.
    """
    from optuna.visualization import matplotlib as plots

    folder = Path(folder)
    name = metric or str(study.user_attrs.get("kiln_metric") or "objective")
    trials = study.get_trials(deepcopy=False)
    written: list[Path] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # the matplotlib plots are marked experimental
        if any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials):
            written.append(_save(plots.plot_optimization_history(study, target_name=name), folder / HISTORY_PNG))
        complete = sum(t.state == TrialState.COMPLETE for t in trials)
        if complete >= 2:
            written.append(_save(plots.plot_param_importances(study, target_name=name), folder / IMPORTANCES_PNG))
        else:
            log.info("study %s: %d complete trials, no parameter importances (they need 2)", study.study_name,
                     complete)
    return written
