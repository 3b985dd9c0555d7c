"""The ``promote`` step: make the verified candidate the champion, in the registry and (a canary) at the endpoint.

The endpoint is changed first, so the registry's ``champion`` alias never names a version the endpoint lacks. The
move is a compare-and-set, under the model's champion lock that ``deploy`` took (renewed first: a run whose lock
was taken over is fenced out): if the champion is no longer the one the decision record compared against, the
candidate is judged again against the new one, and a candidate that does not beat it is taken off the endpoint.
The lock is released at the end, whatever the outcome.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.pipeline.endpoint import DeploymentFailedError, DeployResult, Endpoint, read_deploy_result
from kiln.tasks.pipeline.gate_decision import GateRecord, GateRejectedError, require_passed
from kiln.tasks.storage.artifacts import write_json

if TYPE_CHECKING:
    from kiln.tasks.tracking.registry import Registry


@dataclass(frozen=True)
class PromoteResult:
    """The champion move ``promote`` made; published to ``<run>/promote/report.json``."""

    model: str
    champion: str
    previous: str | None
    strategy: str
    reason: str
    """The gate's reason, recorded with the move in the registry's history."""
    beat: dict[str, Any] | None = None
    """The champion the decision record compared the candidate with (``version``, ``run_id``, ``run_key``), which
    is the one it replaced; ``None`` for the first model."""
    regated: bool = False
    """The candidate was judged again because the champion moved after its gate."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the step's XCom value and its report)."""
        return asdict(self)


def promote(ctx: RunContext) -> PromoteResult:
    """Make the verified candidate the champion: the registry alias, and the served model of a canary.

    Raises:
        GateRejectedError: the gate rejected the candidate, or it does not beat a champion that moved since.
        ChampionLockLostError: the run's champion lock expired and another writer took it (nothing touched).
    """
    from kiln.tasks.pipeline.champion_lock import ChampionLocks, grant_from
    from kiln.tasks.tracking.registry import Registry

    decision = require_passed(ctx)
    deployed = read_deploy_result(ctx)
    grant = grant_from(deployed.lock)
    reg = Registry.from_settings()
    if grant is None:  # a report written before deploy took locks
        return _promote(ctx, reg, decision, deployed)
    locks = ChampionLocks.from_settings()
    try:
        with locks.kept(grant):
            try:
                return _promote(ctx, reg, decision, deployed)
            finally:
                locks.release(grant.model, grant.token)
    finally:
        locks.close()


def _promote(ctx: RunContext, reg: Registry, decision: GateRecord, deployed: DeployResult) -> PromoteResult:
    from kiln.tasks.pipeline.gating import regate_if_moved
    from kiln.tasks.serving.deployment import promote_canary

    version = decision.candidate_version
    current = reg.champion(ctx.spec.name, verified=False)
    history = reg.history(ctx.spec.name)
    last = history[-1] if history else {}
    if last.get("version") == version and last.get("actor") == ctx.run_key:
        # A retry after this run's move was recorded: report it again rather than move twice (and finish it if it
        # was cut short between the history and the alias).
        if current is None or current.version != version:
            reg.set_champion(ctx.spec.name, version, action="gate", reason=decision.reason, actor=ctx.run_key)
        return _publish(ctx, PromoteResult(model=ctx.spec.name, champion=version, previous=last["previous"],
                                           strategy=deployed.strategy, reason=decision.reason,
                                           beat=decision.champion, regated=bool(decision.regated)))
    try:
        decision = regate_if_moved(ctx, reg, decision)
    except GateRejectedError:
        _take_off(ctx, reg, deployed)
        raise
    endpoint = Endpoint.of(ctx.spec)
    if deployed.strategy == "canary":  # served first: the alias never names a version the endpoint lacks
        served = endpoint.current()
        if served is None or served.canary is None or served.canary.version != version:
            raise DeploymentFailedError(f"the {ctx.spec.name} endpoint no longer serves version {version} as its "
                                        f"canary ({endpoint.deployment}); rerun the deploy step")
        endpoint.serve(promote_canary(served))
    beat = decision.champion["version"] if decision.champion else None
    previous = reg.set_champion(ctx.spec.name, version, action="gate", reason=decision.reason, actor=ctx.run_key,
                                expected=beat)
    return _publish(ctx, PromoteResult(model=ctx.spec.name, champion=version,
                                       previous=previous.version if previous else None, strategy=deployed.strategy,
                                       reason=decision.reason, beat=decision.champion,
                                       regated=bool(decision.regated)))


def _take_off(ctx: RunContext, reg: Registry, deployed: DeployResult) -> None:
    """The candidate lost to a champion promoted since: serve that champion again (the registry's)."""
    from kiln.tasks.pipeline.endpoint import serve_champion

    champion = reg.champion(ctx.spec.name)
    if deployed.strategy != "none" and champion is not None:
        serve_champion(Endpoint.of(ctx.spec), champion, reg)


def _publish(ctx: RunContext, result: PromoteResult) -> PromoteResult:
    ctx.publish(keys.PROMOTE, lambda out: write_json(out / keys.REPORT_FILE, result.to_dict()))
    return result
