"""Running steps through the step cache with each step's computation counted: a test sees which steps ran and
which were cache hits (``tests/unit/test_step_cache.py`` and the cache's integration tests)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import RunContext, make_context
from kiln.tasks.pipeline.step_cache import run_step
from kiln.tasks.pipeline.steps import Step, step_named
from kiln.tasks.storage.artifacts import ArtifactStore

DATA_STEPS = (keys.INGEST, keys.CLEAN, keys.BUILD_FEATURES)


class Counted:
    """Steps whose runs are counted (the step functions themselves, wrapped)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def step(self, name: str) -> Step:
        step = step_named(name)

        def run(ctx: RunContext) -> Any:
            self.calls.append(name)
            return step.run(ctx)

        return replace(step, run=run)


def run_data_steps(spec: Path, run_id: str, store: ArtifactStore, counted: Counted,
                   steps: tuple[str, ...] = DATA_STEPS, **params: Any) -> dict[str, dict[str, Any]]:
    """Run ``steps`` of the run ``run_id`` (with the Params ``params``) through the cache, in order."""
    ctx = make_context(spec, run_id, params, store=store)
    return {name: run_step(counted.step(name), ctx) for name in steps}
