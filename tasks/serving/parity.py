"""Train/serve parity: do the served predictions equal the ones the training side recorded for the same rows?

``infra_validate`` checks it in a throwaway server before a deployment, ``verify`` at the live endpoint after it.
"""

from __future__ import annotations

import math
from typing import Any


def _normalise(prediction: dict[str, Any]) -> tuple[str | None, dict[str, float]]:
    """``(label, {class: probability})`` of a classification prediction, ``(None, {"value": v})`` otherwise."""
    if "probabilities" in prediction:
        probs = {str(k): float(v) for k, v in prediction["probabilities"].items()}
        return str(prediction["label"]), probs
    return None, {"value": float(prediction["value"])}


def compare_predictions(served: list[dict[str, Any]], expected: list[dict[str, Any]]) -> tuple[float, str | None]:
    """Largest difference between served and expected predictions, and the first problem found.

    Args:
        served: predictions from the server (``{"label", "probabilities"}`` or ``{"value"}`` per row).
        expected: the training side's predictions for the same rows, in the same format.

    Returns:
        ``(max_abs_diff, problem)``; ``problem`` is ``None`` when every row has the same classes (or a value)
        and every served label is its most probable class. A non-finite served number makes the difference inf.
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
            diff = abs(value - want_values[key])
            worst = max(worst, diff if math.isfinite(diff) else math.inf)
        if label is not None and label != max(got_values, key=got_values.__getitem__):
            return worst, f"row {i}: served label {label!r} is not the most probable class"
    return worst, None
