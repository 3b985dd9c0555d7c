"""The rollout steps of a pipeline run: ``infra_validate`` → ``deploy`` → ``verify`` → ``promote``.

Each refuses to run for a candidate the gate rejected (:class:`kiln.tasks.steps.gate.GateRejectedError`). The embedded
default endpoint is one local model server per pipeline (``kiln.tasks.serving``), started detached on the pipeline's
port and reloaded in place afterwards; its deployment file (``$KILN_SERVING_DIR/<model>/deployment.json``) says
what it serves. ``deploy`` either swaps the champion at once (``direct``) or adds the candidate as a canary;
``verify`` replays the bundle's sample rows through the live endpoint and, for a canary, watches it until it is
judged; a failed check restores the previous deployment. ``promote`` moves the registry's ``champion`` alias (and
makes a judged canary the served champion). :func:`set_champion` is the same move outside a run: an approval or
a rollback, from the CLI or the ``kiln_champion`` DAG.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.settings import get_settings
from kiln.tasks.spec import PipelineSpec
from kiln.tasks.steps.gate import bundle_cache, registry, require_passed
from kiln.tasks.storage.artifacts import read_json, write_json

if TYPE_CHECKING:
    from kiln.tasks.serving.client import ServingClient
    from kiln.tasks.serving.deployment import Deployment, ModelRef
    from kiln.tasks.serving.process import ServerHandle

log = logging.getLogger(__name__)

DEPLOYMENT_FILE = "deployment.json"
REPORT_FILE = "report.json"


class DeploymentFailedError(RuntimeError):
    """The candidate failed in the live endpoint (parity, or a canary judged worse); it was rolled back."""


@dataclass(frozen=True)
class Endpoint:
    """Where one pipeline's model is served on the embedded default."""

    model: str
    host: str
    port: int
    run_dir: Path

    @property
    def deployment(self) -> Path:
        """The deployment file the server reads."""
        return self.run_dir / DEPLOYMENT_FILE

    @property
    def url(self) -> str:
        """The base URL clients use."""
        from kiln.tasks.serving.process import server_url

        return server_url(self.host, self.port)

    @classmethod
    def of(cls, spec: PipelineSpec) -> Endpoint:
        """The endpoint of a pipeline: its ``deployment.port`` or ``KILN_SERVE_PORT``."""
        s = get_settings()
        return cls(spec.name, s.serve_host, spec.deployment.port or s.serve_port, s.serving_dir / spec.name)

    def serve(self, deployment: Deployment) -> ServerHandle:
        """Write ``deployment`` and make the server serve it: reload a running server, or start one."""
        from kiln.tasks.serving.auth import resolve_token
        from kiln.tasks.serving.deployment import write_deployment
        from kiln.tasks.serving.process import ensure_server

        write_deployment(self.deployment, deployment)
        return ensure_server(self.deployment, host=self.host, port=self.port,
                             token=resolve_token(get_settings()), run_dir=self.run_dir)

    def client(self) -> ServingClient:
        """A client of the running server."""
        from kiln.tasks.serving.auth import resolve_token
        from kiln.tasks.serving.client import ServingClient

        return ServingClient(self.url, resolve_token(get_settings()))

    def current(self) -> Deployment | None:
        """The deployment being served, or ``None`` before the first deploy."""
        from kiln.tasks.serving.deployment import read_deployment

        return read_deployment(self.deployment) if self.deployment.is_file() else None


def _candidate_ref(ctx: RunContext, decision: dict[str, Any]) -> ModelRef:
    """The candidate's registered bundle, fetched into the serving cache (the server never reads run folders)."""
    from kiln.tasks.serving.deployment import ModelRef

    reg = registry()
    version = reg.version(ctx.spec.name, decision["candidate"]["version"])
    return ModelRef(version=version.version, bundle=str(reg.fetch_bundle(version, bundle_cache(ctx.spec.name))))


def infra_validate(ctx: RunContext) -> dict[str, Any]:
    """Load the candidate's bundle in the serving runtime and check parity and latency before any deployment.

    Raises:
        GateRejectedError: the gate rejected the candidate.
        InfraValidationError: parity or latency failed (the report is published first).
    """
    from kiln.tasks.steps.infra_validate import InfraValidationConfig, InfraValidationError, run_infra_validation

    require_passed(ctx)
    v = ctx.spec.deployment.infra_validation
    config = InfraValidationConfig(bundle_dir=ctx.input_dir("bundle"), tolerance=v.tolerance,
                                   latency_budget_ms=v.latency_budget_ms, requests=v.requests)
    try:
        result = run_infra_validation(config)
    except InfraValidationError as exc:
        with ctx.store.writer(ctx.key("infra_validate")) as out:
            write_json(out / REPORT_FILE, exc.result.to_dict())
        raise
    with ctx.store.writer(ctx.key("infra_validate")) as out:
        write_json(out / REPORT_FILE, result.to_dict())
    return result.to_dict()


def deploy(ctx: RunContext) -> dict[str, Any]:
    """Serve the candidate: as the champion (``direct``) or as a canary next to it (``canary``).

    A canary needs a champion to be compared with: the first deployment of a model is always direct. The
    deployment it replaces is kept in ``<run>/deploy`` so that ``verify`` can restore it.
    """
    from kiln.tasks.serving.deployment import Deployment, utc_now, with_canary, with_champion

    decision = require_passed(ctx)
    strategy = ctx.spec.deployment.strategy
    if strategy == "none":
        log.info("deployment.strategy is none: the candidate is not served")
        record: dict[str, Any] = {"strategy": "none"}
        with ctx.store.writer(ctx.key("deploy")) as out:  # verify and promote read it
            write_json(out / REPORT_FILE, record)
        return record
    endpoint = Endpoint.of(ctx.spec)
    ref = _candidate_ref(ctx, decision)
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
    record = {"strategy": strategy, "version": ref.version, "url": endpoint.url,
              "previous": previous.to_dict() if previous else None}
    with ctx.store.writer(ctx.key("deploy")) as out:  # before serving: verify must be able to restore
        write_json(out / REPORT_FILE, record)
    endpoint.serve(new)
    log.info("deployed %s version %s (%s) at %s", ctx.spec.name, ref.version, strategy, endpoint.url)
    return record


def _replaced(ctx: RunContext, endpoint: Endpoint, version: str) -> Deployment | None:
    """The deployment this run's candidate replaces.

    Normally the one being served. But if it already serves ``version`` (an earlier attempt of this step got that
    far before failing), it is the one that attempt recorded, so that a retry never takes its own half-finished
    deployment for the previous good state.
    """
    from kiln.tasks.serving.deployment import Deployment

    current = endpoint.current()
    served = {current.champion.version, current.canary.version if current.canary else None} if current else set()
    if version in served and ctx.store.exists(ctx.key("deploy")):
        recorded = read_json(ctx.input_dir("deploy") / REPORT_FILE)["previous"]
        return Deployment.from_dict(recorded) if recorded else None
    return current


def _restore(endpoint: Endpoint, previous: dict[str, Any] | None, model: str) -> None:
    """Put the deployment before this run's ``deploy`` back (or stop serving if there was none)."""
    from kiln.tasks.serving.deployment import Deployment, utc_now
    from kiln.tasks.serving.process import stop_server

    if previous is None:
        stop_server(endpoint.run_dir)
        endpoint.deployment.unlink(missing_ok=True)
        log.warning("stopped the %s server: no earlier model to serve", model)
        return
    endpoint.serve(Deployment.from_dict({**previous, "updated_at": utc_now()}))
    log.warning("restored the earlier deployment of %s (champion version %s)", model,
                previous["champion"]["version"])


def _check_parity(client: ServingClient, bundle_dir: Path, tolerance: float) -> dict[str, Any]:
    """Replay the bundle's sample through the live endpoint; the candidate's answers must match training's."""
    from kiln.tasks.bundle.load import load_bundle, records_from_frame
    from kiln.tasks.steps.infra_validate import compare_predictions

    bundle = load_bundle(bundle_dir)
    raw, expected = bundle.sample()
    served = client.predict(records_from_frame(raw))
    diff, problem = compare_predictions(served["predictions"], bundle.format_predictions(expected))
    return {"rows": len(raw), "max_abs_diff": diff, "version": served["version"], "problem": problem,
            "passed": problem is None and diff <= tolerance}


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


def verify(ctx: RunContext) -> dict[str, Any]:
    """Check the deployed candidate through the live endpoint; roll back to the previous deployment on failure.

    ``direct``: the endpoint must serve the candidate's version with training-side predictions (parity).
    ``canary``: sample rows are replayed as probe traffic while the canary is judged on error rate and latency.

    Raises:
        GateRejectedError: the gate rejected the candidate.
        DeploymentFailedError: the candidate failed; the previous deployment is restored.
    """
    from kiln.tasks.bundle.load import load_bundle, records_from_frame
    from kiln.tasks.serving.canary import CanaryPolicy, watch_canary

    require_passed(ctx)
    record = read_json(ctx.input_dir("deploy") / REPORT_FILE)
    if record["strategy"] == "none":
        return {"strategy": "none"}
    endpoint = Endpoint.of(ctx.spec)
    with endpoint.client() as client:
        if record["strategy"] == "direct":
            client.wait_ready(60, version=record["version"])
            result = _check_parity(client, ctx.input_dir("bundle"), ctx.spec.deployment.infra_validation.tolerance)
            if not result["passed"]:
                _restore(endpoint, record["previous"], ctx.spec.name)
                raise DeploymentFailedError(
                    f"version {record['version']} served predictions that differ from training's by "
                    f"{result['max_abs_diff']:.3g} ({result['problem'] or 'values'}); rolled back")
            return {"strategy": "direct", **result}
        c = ctx.spec.deployment.canary
        policy = CanaryPolicy(share=c.share, min_requests=c.min_requests, window_s=c.window_s,
                              max_error_rate_increase=c.max_error_rate_increase,
                              max_latency_ratio=c.max_latency_ratio)
        records = records_from_frame(load_bundle(ctx.input_dir("bundle")).sample()[0])
        stop = threading.Event()
        # Enough probe requests that the canary's share reaches min_requests well within the window.
        rate = max(5.0, 3 * c.min_requests / (c.share * c.window_s))
        probe = threading.Thread(target=_probe_traffic, args=(client, records, stop, rate), daemon=True)
        probe.start()
        try:
            verdict = watch_canary(client, policy)
        finally:
            stop.set()
            probe.join(timeout=10)
    if not verdict.promote:
        _restore(endpoint, record["previous"], ctx.spec.name)
        raise DeploymentFailedError(f"canary version {record['version']} rolled back: {verdict.reason}")
    log.info("canary version %s judged healthy: %s", record["version"], verdict.reason)
    return {"strategy": "canary", **verdict.to_dict()}


def promote(ctx: RunContext) -> dict[str, Any]:
    """Make the verified candidate the champion: the registry alias, and the served model of a canary."""
    from kiln.tasks.serving.deployment import promote_canary

    decision = require_passed(ctx)
    version = decision["candidate"]["version"]
    record = read_json(ctx.input_dir("deploy") / REPORT_FILE)
    if record["strategy"] == "canary":  # served first: the alias never names a version the endpoint lacks
        endpoint = Endpoint.of(ctx.spec)
        current = endpoint.current()
        if current is None or current.canary is None or current.canary.version != version:
            raise DeploymentFailedError(f"the {ctx.spec.name} endpoint no longer serves version {version} as its "
                                        f"canary ({endpoint.deployment}); rerun the deploy step")
        endpoint.serve(promote_canary(current))
    previous = registry().set_champion(ctx.spec.name, version, action="gate", reason=decision["reason"],
                                       actor=ctx.run_key)
    result = {"model": ctx.spec.name, "champion": version, "previous": previous.version if previous else None,
              "strategy": record["strategy"], "reason": decision["reason"]}
    with ctx.store.writer(ctx.key("promote")) as out:
        write_json(out / REPORT_FILE, result)
    return result


def set_champion(spec: PipelineSpec, version: str | None, *, action: str, reason: str,
                 actor: str) -> dict[str, Any]:
    """Move ``champion`` outside a pipeline run (an approval or a rollback) and serve that version.

    Args:
        spec: the pipeline whose model it is.
        version: the version; ``None`` with ``action="rollback"``: the champion before the current one.
        action: ``approve`` or ``rollback``.
        reason: why (recorded in the registry's history).
        actor: who (a user, a DAG run).

    Raises:
        RegistryError: unknown version, or nothing to roll back to.
    """
    from kiln.tasks.serving.deployment import ModelRef, drop_canary, with_champion

    reg = registry()
    target = reg.version(spec.name, version or reg.rollback_target(spec.name))
    endpoint = Endpoint.of(spec)
    current = endpoint.current()
    # Served first (as in promote): the alias never names a version the endpoint lacks.
    if current is not None:  # the model is served: serve the new champion (without any canary in flight)
        ref = ModelRef(version=target.version, bundle=str(reg.fetch_bundle(target, bundle_cache(spec.name))))
        endpoint.serve(with_champion(drop_canary(current) if current.canary else current, ref))
        with endpoint.client() as client:
            client.wait_ready(60, version=target.version)
    previous = reg.set_champion(spec.name, target.version, action=action, reason=reason, actor=actor)
    return {"model": spec.name, "champion": target.version, "previous": previous.version if previous else None,
            "action": action, "url": endpoint.url if current is not None else None}
