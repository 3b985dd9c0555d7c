"""The ``deploy`` step: serve a candidate that passed the gate, as the champion or as a canary next to it.

``direct`` swaps the served champion at once; ``canary`` adds the candidate beside the champion with a share of the
traffic, judged by ``verify``. The deployment it replaces is recorded first, so ``verify`` can restore it.

One run at a time changes a model's champion: ``deploy`` takes the model's champion lock
(:mod:`kiln.tasks.pipeline.champion_lock`), waiting for another run's deploy → verify → promote, and keeps it for
``verify`` and ``promote``. If the champion moved after this run's gate compared against it, the candidate is
judged again against the new one first (:func:`~kiln.tasks.pipeline.gating.regate_if_moved`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.pipeline.endpoint import DeployResult, Endpoint, bundle_cache, read_deploy_result
from kiln.tasks.pipeline.gate_decision import GateRecord, require_passed
from kiln.tasks.storage.artifacts import write_json

if TYPE_CHECKING:
    from kiln.tasks.pipeline.champion_lock import LockGrant
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
    """Take the model's champion lock, then serve the candidate: as the champion (``direct``) or as a canary next
    to it (``canary``).

    A canary needs a champion to be compared with: the first deployment of a model is always direct. The
    deployment it replaces is kept in ``<run>/deploy`` so that ``verify`` can restore it.

    Raises:
        GateRejectedError: the gate rejected the candidate, or it does not beat a champion promoted since.
        ChampionLockError: another run held the lock for longer than the wait.
    """
    from kiln.tasks.pipeline.champion_lock import ChampionLocks
    from kiln.tasks.pipeline.gating import regate_if_moved
    from kiln.tasks.tracking.registry import Registry

    record = require_passed(ctx)
    locks = ChampionLocks.from_settings()
    grant = locks.acquire(ctx.spec.name, ctx.run_key)
    changing: list[bool] = []  # set once the endpoint may have changed
    try:
        # Until the endpoint changes, a failure lets go at once; after that a retry must find the lock its own.
        record = regate_if_moved(ctx, Registry.from_settings(), record)
        return _deploy(ctx, record, grant, changing)
    except BaseException:
        if not changing:
            locks.release(ctx.spec.name, grant.token)
        raise
    finally:
        locks.close()


def _deploy(ctx: RunContext, record: GateRecord, grant: LockGrant, changing: list[bool]) -> DeployResult:
    from dataclasses import replace

    from kiln.tasks.serving.deployment import CaptureSettings, Deployment, utc_now, with_canary, with_champion

    strategy = ctx.spec.deployment.strategy
    lock = {"lock": grant.to_dict(), "lock_wait_s": grant.waited_s}
    if strategy == "none":
        log.info("deployment.strategy is none: the candidate is not served")
        result = DeployResult(strategy="none", **lock)
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
    new = replace(new, capture=CaptureSettings(ctx.spec.deployment.capture_share),
                  replicas=ctx.spec.deployment.replicas)
    result = DeployResult(strategy=strategy, version=ref.version, url=endpoint.url,
                          previous=previous.to_dict() if previous else None, **lock)
    # Published before serving: verify must be able to restore the previous deployment.
    changing.append(True)
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
