"""The ``deploy`` step: serve a candidate that passed the gate, as the champion or as a canary next to it.

``direct`` swaps the served champion at once; ``canary`` adds the candidate beside the champion with a share of the
traffic, judged by ``verify``. The deployment it replaces is recorded first, so ``verify`` can restore it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.pipeline.endpoint import DeployResult, Endpoint, bundle_cache, read_deploy_result
from kiln.tasks.pipeline.gate_decision import require_passed
from kiln.tasks.storage.artifacts import write_json

if TYPE_CHECKING:
    from kiln.tasks.serving.deployment import Deployment, ModelRef

log = logging.getLogger(__name__)


def _candidate_ref(ctx: RunContext, candidate: str) -> ModelRef:
    """The candidate's registered bundle, fetched into the serving cache (the server never reads run folders)."""
    from kiln.tasks.serving.deployment import ModelRef
    from kiln.tasks.tracking.registry import Registry

    reg = Registry.from_settings()
    version = reg.version(ctx.spec.name, candidate)
    return ModelRef(version=version.version, bundle=str(reg.fetch_bundle(version, bundle_cache(ctx.spec.name))))


def deploy(ctx: RunContext) -> DeployResult:
    """Serve the candidate: as the champion (``direct``) or as a canary next to it (``canary``).

    A canary needs a champion to be compared with: the first deployment of a model is always direct. The
    deployment it replaces is kept in ``<run>/deploy`` so that ``verify`` can restore it.
    """
    from kiln.tasks.serving.deployment import Deployment, utc_now, with_canary, with_champion

    record = require_passed(ctx)
    strategy = ctx.spec.deployment.strategy
    if strategy == "none":
        log.info("deployment.strategy is none: the candidate is not served")
        result = DeployResult(strategy="none")
        ctx.publish(keys.DEPLOY, lambda out: write_json(out / keys.REPORT_FILE, result.to_dict()))  # verify reads it
        return result
    endpoint = Endpoint.of(ctx.spec)
    ref = _candidate_ref(ctx, record.candidate_version)
    previous = _replaced(ctx, endpoint, ref.version)
    if previous is None:
        if strategy == "canary":
            log.info("no model of %s is served yet: a canary needs a champion to compare with; deploying directly",
                     ctx.spec.name)
            strategy = "direct"
        new = Deployment(model=ctx.spec.name, champion=ref, canary=None, updated_at=utc_now())
    elif strategy == "canary":
        new = with_canary(previous, ref, ctx.spec.deployment.canary.share)
    else:
        new = with_champion(previous, ref)
    result = DeployResult(strategy=strategy, version=ref.version, url=endpoint.url,
                          previous=previous.to_dict() if previous else None)
    # Published before serving: verify must be able to restore the previous deployment.
    ctx.publish(keys.DEPLOY, lambda out: write_json(out / keys.REPORT_FILE, result.to_dict()))
    endpoint.serve(new)
    log.info("deployed %s version %s (%s) at %s", ctx.spec.name, ref.version, strategy, endpoint.url)
    return result


def _replaced(ctx: RunContext, endpoint: Endpoint, version: str) -> Deployment | None:
    """The deployment this run's candidate replaces.

    Normally the one being served. But if it already serves ``version`` (an earlier attempt of this step got that
    far before failing), it is the one that attempt recorded, so that a retry never takes its own half-finished
    deployment for the previous good state.
    """
    from kiln.tasks.serving.deployment import Deployment

    current = endpoint.current()
    served = {current.champion.version, current.canary.version if current.canary else None} if current else set()
    if version in served and ctx.store.exists(ctx.key(keys.DEPLOY)):
        recorded = read_deploy_result(ctx).previous
        return Deployment.from_dict(recorded) if recorded else None
    return current
