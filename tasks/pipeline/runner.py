"""Every step of a run in this process, in order: for notebooks, tests and benchmarks (the DAG runs them as tasks)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import RunContext, StepResult
from kiln.tasks.pipeline.gate_decision import GateRejectedError
from kiln.tasks.pipeline.step_cache import execute_step
from kiln.tasks.pipeline.steps import step_named, steps_of

log = logging.getLogger(__name__)


class StepOutput:
    """What a step returned: its result dict (its XCom, with ``cache`` and ``peak_rss_mib``) and, when it ran
    rather than came from the cache, its typed result, whose attributes read through."""

    def __init__(self, result: dict[str, Any], typed: StepResult | None = None):
        self._result = result
        self.typed = typed

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "typed":
            raise AttributeError(name)
        if self.typed is not None:
            return getattr(self.typed, name)
        try:
            return self._result[name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        return f"StepOutput({self._result!r})"

    def to_dict(self) -> dict[str, Any]:
        """The result dict."""
        return self._result


@dataclass
class RunResult:
    """What each step of an in-process run returned."""

    results: dict[str, StepOutput] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    """Steps skipped because the gate rejected the candidate, with the reason."""
    duration_s: float = 0.0

    def __getitem__(self, step: str) -> StepOutput:
        return self.results[step]

    def to_dict(self) -> dict[str, Any]:
        """Each step's result as a dict (a skipped step: ``{"skipped": reason}``), and the duration."""
        return {**{k: v.to_dict() for k, v in self.results.items()},
                **{k: {"skipped": v} for k, v in self.skipped.items()}, "duration_s": self.duration_s}


def run_all(ctx: RunContext, until: str | None = None) -> RunResult:
    """Run every step in this process, in order, up to and including ``until`` (default: all of them), through the
    step cache (:func:`kiln.tasks.pipeline.step_cache.run_step`).

    A candidate the gate rejects ends the run after ``gate`` (the later steps are recorded as skipped, with the
    reason), as the DAG skips them.

    Args:
        ctx: the run.
        until: the last step to run, e.g. ``keys.EVALUATE`` to stop before the release steps.

    Raises:
        KeyError: ``until`` names no step.
    """
    steps = steps_of(ctx.spec)
    last = step_named(until).name if until else steps[-1].name
    t0 = time.perf_counter()
    run = RunResult()
    for step in steps:
        log.info("step %s", step.name)
        try:
            run.results[step.name] = StepOutput(*execute_step(step, ctx))
        except GateRejectedError as exc:
            run.skipped[step.name] = str(exc)
            log.info("step %s skipped: %s", step.name, exc)
        if step.name == keys.STUDY:
            run.results.update(run_trials(ctx, run.results[step.name].indices))
        if step.name == last:
            break
    run.duration_s = round(time.perf_counter() - t0, 3)
    return run


def run_trials(ctx: RunContext, indices: list[int]) -> dict[str, StepOutput]:
    """A tuned run's trials in this process, one after another (the DAG runs them as mapped tasks, several at
    once). A pruned or failed trial is recorded in the study and the next one runs.

    Returns:
        Each trial's output under ``trial[<index>]``: its result, or ``{"pruned": ...}`` / ``{"failed": ...}``.
    """
    from kiln.tasks.steps.trial import TrialPrunedError, trial

    out: dict[str, StepOutput] = {}
    for index in indices:
        name = f"{keys.TRIAL}[{index}]"
        log.info("step %s", name)
        try:
            result = trial(ctx, index)
            out[name] = StepOutput(result.to_dict(), result)
        except TrialPrunedError as exc:
            out[name] = StepOutput({"pruned": str(exc)})
        except Exception as exc:  # noqa: BLE001 (recorded FAIL in the study, which goes on; train reports it)
            log.warning("trial %d failed: %s", index, exc)
            out[name] = StepOutput({"failed": f"{type(exc).__name__}: {exc}"[:2000]})
    return out
