"""Great Expectations results and errors as plain JSON-safe data, for the ``validate`` step's report and messages."""

from __future__ import annotations

import difflib
import math
from typing import Any

#: Unexpected values kept per failed expectation in the report.
REPORT_EXAMPLES = 10


def expectation_report(r: Any) -> dict[str, Any]:
    """One expectation's outcome as JSON-safe data.

    Args:
        r: a GX ``ExpectationValidationResult``.

    Returns:
        type, kwargs, success, unexpected_count, partial_unexpected_list, observed_value, error and hint.
    """
    cfg = r.expectation_config
    result = dict(r.result or {})
    return jsonable({
        "type": cfg.type,
        "kwargs": {k: v for k, v in cfg.kwargs.items() if k != "batch_id"},
        "success": bool(r.success),
        "unexpected_count": result.get("unexpected_count"),
        "partial_unexpected_list": list(result.get("partial_unexpected_list") or [])[:REPORT_EXAMPLES],
        "observed_value": result.get("observed_value"),
        "error": exception_message(r.exception_info),
        "hint": (cfg.meta or {}).get("hint"),
    })


def exception_message(info: Any) -> str | None:
    """The message of an exception GX caught while evaluating an expectation (flat or keyed by metric).

    Args:
        info: the result's ``exception_info``.

    Returns:
        The message(s), or ``None`` when nothing was raised.
    """
    if not isinstance(info, dict):
        return None
    if "raised_exception" in info:
        return info.get("exception_message") if info.get("raised_exception") else None
    messages = [v.get("exception_message") for v in info.values() if isinstance(v, dict) and v.get("raised_exception")]
    return "; ".join(dict.fromkeys(m for m in messages if m)) or None


def kwargs_problems(exc: Exception, allowed: list[str]) -> str:
    """A short description of a pydantic error on expectation kwargs: the first problem per field.

    Args:
        exc: the error an expectation's constructor raised.
        allowed: the expectation's kwargs (for "did you mean").

    Returns:
        One phrase per field, joined by ``; ``.
    """
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    problems: dict[str, str] = {}
    for err in errors():
        name = ".".join(str(p) for p in err.get("loc", ())) or "kwargs"
        if name in problems:
            continue
        if err.get("type") == "value_error.extra":
            close = difflib.get_close_matches(name, allowed, n=1)
            problems[name] = f"unknown kwarg '{name}'" + (f" (did you mean '{close[0]}'?)" if close else "")
        elif err.get("type") == "value_error.missing":
            problems[name] = f"kwarg '{name}' is required"
        elif name == "__root__":
            problems[name] = err.get("msg", "")
        else:
            problems[name] = f"kwarg '{name}': {err.get('msg', '')}"
    return "; ".join(problems.values())


def jsonable(obj: Any) -> Any:
    """Recursively convert numpy scalars, NaN and other non-JSON values into plain JSON values.

    Args:
        obj: a value of a GX result.

    Returns:
        The value with dicts, lists and scalars JSON can hold (non-finite floats become ``None``).
    """
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [jsonable(v) for v in obj]
    import numpy as np
    import pandas as pd

    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if obj is pd.NA or obj is pd.NaT:
        return None
    return str(obj)
