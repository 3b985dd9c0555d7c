"""The ``verify`` step: check the deployed candidate through the live endpoint; roll back on a failure.

``direct``: the endpoint must serve the candidate's version with the training side's predictions (parity).
``canary``: the bundle's sample rows are replayed as probe traffic while the canary is judged on its error rate
and latency against the champion's.

It runs under the model's champion lock that ``deploy`` took: renewed first (a run whose lock was taken over is
fenced out before it touches the endpoint) and while the canary is watched; a rollback lets go of it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.pipeline.endpoint import DeploymentFailedError, DeployResult, Endpoint, read_deploy_result, restore
from kiln.tasks.pipeline.gate_decision import require_passed

if TYPE_CHECKING:
    from kiln.tasks.serving.client import ServingClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyResult:
    """The live endpoint's verdict on the deployed candidate."""

    strategy: str
    passed: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)
    """Parity figures (``direct``) or the canary's verdict and statistics (``canary``)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the step's XCom value)."""
        return {**self.details, "strategy": self.strategy, "passed": self.passed, "reason": self.reason}


def verify(ctx: RunContext) -> VerifyResult:
    """Check the deployed candidate through the live endpoint; roll back to the previous deployment on failure.

    ``direct``: the endpoint must serve the candidate's version with training-side predictions (parity).
    ``canary``: sample rows are replayed as probe traffic while the canary is judged on error rate and latency.

    Raises:
        GateRejectedError: the gate rejected the candidate.
        DeploymentFailedError: the candidate failed; the previous deployment is restored.
        ChampionLockLostError: the run's champion lock expired and another writer took it (nothing touched).
    """
    from kiln.tasks.pipeline.champion_lock import ChampionLocks, grant_from

    require_passed(ctx)
    deployed = read_deploy_result(ctx)
    grant = grant_from(deployed.lock)
    if grant is None:  # a report written before deploy took locks
        return _verify(ctx, deployed)
    locks = ChampionLocks.from_settings()
    try:
        with locks.kept(grant):
            try:
                return _verify(ctx, deployed)
            except DeploymentFailedError:
                locks.release(grant.model, grant.token)  # rolled back: this run is done with the champion
                raise
    finally:
        locks.close()


def _verify(ctx: RunContext, deployed: DeployResult) -> VerifyResult:
    from kiln.tasks.bundle.load import load_bundle, records_from_frame
    from kiln.tasks.evaluation.canary import watch_canary

    if deployed.strategy == "none":
        return VerifyResult(strategy="none", passed=True, reason="not served (deployment.strategy none)")
    endpoint = Endpoint.of(ctx.spec)
    with endpoint.client() as client:
        if deployed.strategy == "direct":
            client.wait_ready(60, version=deployed.version)
            parity = _check_parity(client, ctx.input_dir(keys.BUNDLE),
                                   ctx.spec.deployment.infra_validation.tolerance)
            if not parity["passed"]:
                restore(endpoint, deployed.previous, ctx.spec.name)
                raise DeploymentFailedError(
                    f"version {deployed.version} served predictions that differ from training's by "
                    f"{parity['max_diff']:.3g} ({parity['problem'] or 'values'}); rolled back")
            return VerifyResult(strategy="direct", passed=True, reason="served predictions match training's",
                                details=parity)
        c = ctx.spec.deployment.canary
        records = records_from_frame(load_bundle(ctx.input_dir(keys.BUNDLE)).sample()[0])
        stop = threading.Event()
        # Enough probe requests that the canary's share reaches min_requests well within the window.
        rate = max(5.0, 3 * c.min_requests / (c.share * c.window_s))
        probe = threading.Thread(target=_probe_traffic, args=(client, records, stop, rate), daemon=True)
        probe.start()
        try:
            verdict = watch_canary(client, c)
        finally:
            stop.set()
            probe.join(timeout=10)
    if not verdict.promote:
        restore(endpoint, deployed.previous, ctx.spec.name)
        raise DeploymentFailedError(f"canary version {deployed.version} rolled back: {verdict.reason}")
    log.info("canary version %s judged healthy: %s", deployed.version, verdict.reason)
    return VerifyResult(strategy="canary", passed=True, reason=verdict.reason, details=verdict.to_dict())


def _check_parity(client: ServingClient, bundle_dir: Path, tolerance: float) -> dict[str, Any]:
    """Replay the bundle's sample through the live endpoint; the candidate's answers must match training's."""
    from kiln.tasks.bundle.load import load_bundle, records_from_frame
    from kiln.tasks.bundle.parity import PARITY_RULE, compare_predictions

    bundle = load_bundle(bundle_dir)
    raw, expected = bundle.sample()
    served = client.predict(records_from_frame(raw))
    diff, problem = compare_predictions(served["predictions"], bundle.format_predictions(expected))
    return {"rows": len(raw), "max_diff": diff, "compared": PARITY_RULE, "version": served["version"],
            "problem": problem, "passed": problem is None and diff <= tolerance}


def _probe_traffic(client: ServingClient, records: list[dict[str, Any]], stop: threading.Event,
                   rate_per_s: float) -> None:
    """Replay sample rows one per request while a canary is watched (live traffic adds to it)."""
    i = 0
    while not stop.wait(1.0 / rate_per_s):
        try:
            client.predict([records[i % len(records)]])
        except Exception as exc:  # noqa: BLE001 (the canary judge counts errors; the probe just keeps going)
            log.debug("probe request failed: %s", exc)
        i += 1
