"""The ``promote`` step: make the verified candidate the champion, in the registry and (a canary) at the endpoint.

The endpoint is changed first, so the registry's ``champion`` alias never names a version the endpoint lacks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.pipeline.endpoint import DeploymentFailedError, Endpoint, read_deploy_result
from kiln.tasks.pipeline.gate_decision import require_passed
from kiln.tasks.storage.artifacts import write_json


@dataclass(frozen=True)
class PromoteResult:
    """The champion move ``promote`` made; published to ``<run>/promote/report.json``."""

    model: str
    champion: str
    previous: str | None
    strategy: str
    reason: str
    """The gate's reason, recorded with the move in the registry's history."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the step's XCom value and its report)."""
        return asdict(self)


def promote(ctx: RunContext) -> PromoteResult:
    """Make the verified candidate the champion: the registry alias, and the served model of a canary."""
    from kiln.tasks.serving.deployment import promote_canary
    from kiln.tasks.tracking.registry import Registry

    decision = require_passed(ctx)
    version = decision.candidate_version
    deployed = read_deploy_result(ctx)
    if deployed.strategy == "canary":  # served first: the alias never names a version the endpoint lacks
        endpoint = Endpoint.of(ctx.spec)
        current = endpoint.current()
        if current is None or current.canary is None or current.canary.version != version:
            raise DeploymentFailedError(f"the {ctx.spec.name} endpoint no longer serves version {version} as its "
                                        f"canary ({endpoint.deployment}); rerun the deploy step")
        endpoint.serve(promote_canary(current))
    previous = Registry.from_settings().set_champion(ctx.spec.name, version, action="gate", reason=decision.reason,
                                                     actor=ctx.run_key)
    result = PromoteResult(model=ctx.spec.name, champion=version, previous=previous.version if previous else None,
                           strategy=deployed.strategy, reason=decision.reason)
    ctx.publish(keys.PROMOTE, lambda out: write_json(out / keys.REPORT_FILE, result.to_dict()))
    return result
