"""The ``gate`` step: may this run's candidate replace the champion?

The candidate AND the current champion are scored on this run's test rows (the same snapshot for both; the
champion's own bundle transforms the raw rows), then the spec's thresholds, margin, bootstrap bounds and slice
checks are applied (:mod:`kiln.tasks.pipeline.gating`). The decision record goes to ``<run>/gate`` and to MLflow. A
rejected candidate is not an error of the step: the decision is its output, and the later steps refuse to deploy
it (:mod:`kiln.tasks.pipeline.gate_decision`). The champion may still move before this run deploys (another run
promotes): ``deploy`` then judges the candidate again, under the model's champion lock.
"""

from __future__ import annotations

import logging

from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.pipeline.gate_decision import GateRecord

log = logging.getLogger(__name__)


def gate(ctx: RunContext) -> GateRecord:
    """Decide whether this run's candidate may replace the champion; publish and log the decision record.

    Raises:
        RuntimeError: the candidate was not registered (run ``register`` first).
        ChampionMismatchError: the champion alias does not match kiln's last recorded move (moved outside kiln).
    """
    from kiln.tasks.pipeline.gating import candidate_of, judge, publish_decision
    from kiln.tasks.tracking.registry import Registry

    reg = Registry.from_settings()
    candidate = candidate_of(ctx, reg)
    record = judge(ctx, reg, candidate, reg.champion(ctx.spec.name))
    publish_decision(ctx, reg, record)
    log.info("gate %s: %s", record.decision.upper(), record.reason)
    return record
