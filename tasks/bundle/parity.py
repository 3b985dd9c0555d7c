"""Train/serve parity: do a model's predictions through a serving path equal the ones training recorded?

``register`` checks the bundle it exports (both of the bundle's own paths), ``infra_validate`` a throwaway server
before a deployment, ``verify`` the live endpoint after it. All three compare by :func:`scaled_difference`: class
probabilities by their absolute difference, regression values relative to their size (float32 rounds a value in
the thousands by about 1e-4, so an absolute tolerance would fail every such model).
"""

from __future__ import annotations

import math
from typing import Any

#: What :func:`scaled_difference` compares, for reports.
PARITY_RULE = "|served - expected| / max(1, |expected|): absolute for probabilities, relative for values above 1"


def scaled_difference(got: Any, want: Any) -> Any:
    """``|got - want| / max(1, |want|)``, elementwise for arrays (NaN stays NaN)."""
    import numpy as np  # here: the steps that only quote PARITY_RULE import this module while a DAG file parses

    return np.abs(np.subtract(got, want, dtype=np.float64)) / np.maximum(1.0, np.abs(np.asarray(want, np.float64)))


def _normalise(prediction: dict[str, Any]) -> tuple[str | None, dict[str, float]]:
    """``(label, {class: probability})`` of a classification prediction, ``(None, {"value": v})`` otherwise."""
    if "probabilities" in prediction:
        probs = {str(k): float(v) for k, v in prediction["probabilities"].items()}
        return str(prediction["label"]), probs
    return None, {"value": float(prediction["value"])}


def compare_predictions(served: list[dict[str, Any]], expected: list[dict[str, Any]]) -> tuple[float, str | None]:
    """Largest :func:`scaled_difference` between served and expected predictions, and the first problem found.

    Args:
        served: predictions from the server (``{"label", "probabilities"}`` or ``{"value"}`` per row).
        expected: the training side's predictions for the same rows, in the same format.

    Returns:
        ``(max_diff, problem)``; ``problem`` is ``None`` when every row has the same classes (or a value) and every
        served label is its most probable class. A non-finite served number makes the difference inf.
    """
    if len(served) != len(expected):
        return math.inf, f"the server returned {len(served)} predictions for {len(expected)} rows"
    worst = 0.0
    for i, (got, want) in enumerate(zip(served, expected, strict=True)):
        label, got_values = _normalise(got)
        _, want_values = _normalise(want)
        if set(got_values) != set(want_values):
            return math.inf, f"row {i}: served keys {sorted(got_values)} differ from expected {sorted(want_values)}"
        for key, value in got_values.items():
            diff = float(scaled_difference(value, want_values[key]))
            worst = max(worst, diff if math.isfinite(diff) else math.inf)
        if label is not None and label != max(got_values, key=got_values.__getitem__):
            return worst, f"row {i}: served label {label!r} is not the most probable class"
    return worst, None
