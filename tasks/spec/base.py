"""What every part of the pipeline spec shares: its strict base model, its error, and the task and metric names."""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TaskType = Literal["classification", "regression"]
ColumnType = Literal["numeric", "categorical", "ignore"]

CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "roc_auc", "log_loss")
REGRESSION_METRICS = ("rmse", "mae", "r2")
#: Metrics where a larger value is better; the gate compares in this direction.
HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "roc_auc": True, "log_loss": False,
                    "rmse": False, "mae": False, "r2": True}


#: Bounds shared by numeric fields: every integer a spec or a trigger gives must fit the int64 that Airflow's task
#: supervisor, the databases and numpy hold; counts and durations get sensible ranges well inside that.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
MAX_COUNT = 10**12
"""The largest count of rows or requests a spec may name."""
DAY_S = 86_400


class SpecError(ValueError):
    """A spec file (or a trigger-time override) is invalid. ``problems`` holds one line per bad field."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid pipeline spec {source}:\n{lines}")


class _Strict(BaseModel):
    # Each field's docstring is its description: the trigger form reads it from there. No setting of a spec is
    # meant to be NaN or infinite, and a comparison with NaN is always false (a NaN threshold would pass anything).
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)


def metric_problem(task: str, names: list[str]) -> str | None:
    """Why metric ``names`` cannot be used for ``task`` (the first one ``evaluate`` does not compute), or None."""
    allowed = CLASSIFICATION_METRICS if task == "classification" else REGRESSION_METRICS
    for name in names:
        if name not in allowed:
            return f"metric '{name}' is not computed for task '{task}'; allowed: {', '.join(allowed)}"
    return None


def unknown_key(key: str, allowed: list[str]) -> str:
    """The message for an unknown field ``key``: the closest allowed name, then all of them."""
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown field '{key}'{hint} allowed: {', '.join(allowed)}"


def set_field(data: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    """Set the dotted ``field`` (``training.learning_rate``, ``training.params.depth``) of a dumped spec to
    ``value``, in place; returns ``data``."""
    node = data
    *parents, leaf = field.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return data
