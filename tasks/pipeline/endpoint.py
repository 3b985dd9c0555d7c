"""Where a pipeline's model is served, and the bundle cache its versions are fetched into.

The embedded default endpoint is one local model server per pipeline (:mod:`kiln.tasks.serving`), started detached
on the pipeline's port and reloaded in place afterwards; its deployment file (``$KILN_SERVING_DIR/<model>/
deployment.json``) says what it serves. ``deploy``, ``verify`` and ``promote`` change it within a run, and
:mod:`kiln.tasks.pipeline.champion` outside one.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.tasks.pipeline import keys
from kiln.tasks.settings import get_settings
from kiln.tasks.spec import PipelineSpec
from kiln.tasks.storage.artifacts import read_json

if TYPE_CHECKING:
    from kiln.tasks.pipeline.context import RunContext
    from kiln.tasks.serving.client import ServingClient
    from kiln.tasks.serving.deployment import Deployment
    from kiln.tasks.serving.process import ServerHandle
    from kiln.tasks.tracking.registry import ModelVersionInfo, Registry

log = logging.getLogger(__name__)

DEPLOYMENT_FILE = "deployment.json"


class DeploymentFailedError(RuntimeError):
    """The candidate failed in the live endpoint (parity, or a canary judged worse); it was rolled back."""


@dataclass(frozen=True)
class DeployResult:
    """What ``deploy`` did; published to ``<run>/deploy/report.json`` before the endpoint changes."""

    strategy: str
    """``direct``, ``canary`` (a first deployment is always direct) or ``none``."""
    version: str | None = None
    url: str | None = None
    previous: dict[str, Any] | None = None
    """The deployment it replaced (``None``: nothing was served), which ``verify`` restores on a failure."""
    lock: dict[str, Any] | None = None
    """The model's champion lock this run holds until ``promote`` (:class:`~kiln.tasks.pipeline.champion_lock.
    LockGrant`); ``verify`` and ``promote`` renew it with its token before they act."""
    lock_wait_s: float = 0.0
    """How long ``deploy`` waited for another run's deploy → verify → promote to finish."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the step's XCom value and its report)."""
        return asdict(self)


def read_deploy_result(ctx: RunContext) -> DeployResult:
    """What this run's ``deploy`` recorded.

    Raises:
        ArtifactNotFoundError: ``deploy`` has not run.
    """
    return DeployResult(**read_json(ctx.input_dir(keys.DEPLOY) / keys.REPORT_FILE))


def bundle_cache(model: str) -> Path:
    """Where versions of ``model`` are fetched for serving and for scoring the champion."""
    return get_settings().serving_dir / model / "bundles"


@dataclass(frozen=True)
class Endpoint:
    """Where one pipeline's model is served on the embedded default."""

    model: str
    host: str
    port: int
    run_dir: Path
    port_setting: str = "KILN_SERVE_PORT"
    """The setting that chose ``port``, for the error about a port that is taken."""

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
        if spec.deployment.port:
            return cls(spec.name, s.serve_host, spec.deployment.port, s.serving_dir / spec.name,
                       f"deployment.port of the {spec.name} spec")
        return cls(spec.name, s.serve_host, s.serve_port, s.serving_dir / spec.name)

    def serve(self, deployment: Deployment) -> ServerHandle:
        """Write ``deployment`` and make the server serve it: reload a running server, or start one.

        Raises:
            ValueError: its ``replicas`` (and a canary's replica) ask for more than their pool can hold; nothing was
                written, and what is served stays.
        """
        from kiln.tasks.serving.auth import resolve_token
        from kiln.tasks.serving.deployment import write_deployment
        from kiln.tasks.serving.process import ensure_server

        if deployment.replicas is not None:
            from kiln.tasks.fleet.leases import check_capacity
            from kiln.tasks.pools.inventory import Inventory

            check_capacity(Inventory.from_settings(), deployment.replicas, canary=deployment.canary is not None)
        write_deployment(self.deployment, deployment)
        handle = ensure_server(self.deployment, host=self.host, port=self.port,
                               token=resolve_token(get_settings()), run_dir=self.run_dir,
                               port_setting=self.port_setting)
        self._publish(deployment)
        return handle

    def _publish(self, deployment: Deployment | None) -> None:
        """Record what is served in the artifact store, for the other hosts (:mod:`kiln.tasks.pipeline.served`)."""
        from kiln.tasks.pipeline.context import default_store
        from kiln.tasks.pipeline.served import publish_served

        publish_served(default_store(), self.model, deployment)

    def client(self) -> ServingClient:
        """A client of the running server."""
        from kiln.tasks.serving.auth import resolve_token
        from kiln.tasks.serving.client import ServingClient

        return ServingClient(self.url, resolve_token(get_settings()))

    def current(self) -> Deployment | None:
        """The deployment being served, or ``None`` before the first deploy."""
        from kiln.tasks.serving.deployment import read_deployment

        return read_deployment(self.deployment) if self.deployment.is_file() else None


def restore(endpoint: Endpoint, previous: dict[str, Any] | None, model: str) -> None:
    """Put the deployment before this run's ``deploy`` back (or stop serving if there was none)."""
    from kiln.tasks.serving.deployment import Deployment, utc_now
    from kiln.tasks.serving.process import stop_server

    if previous is None:
        stop_server(endpoint.run_dir)
        endpoint.deployment.unlink(missing_ok=True)
        endpoint._publish(None)
        log.warning("stopped the %s server: no earlier model to serve", model)
        return
    endpoint.serve(Deployment.from_dict({**previous, "updated_at": utc_now()}))
    log.warning("restored the earlier deployment of %s (champion version %s)", model,
                previous["champion"]["version"])


def serve_champion(endpoint: Endpoint, version: ModelVersionInfo, reg: Registry) -> None:
    """Serve ``version`` as the champion of a model being served (a canary in flight is dropped), and wait until
    the server answers with it."""
    from kiln.tasks.serving.deployment import ModelRef, drop_canary, with_champion

    current = endpoint.current()
    if current is None:
        return
    ref = ModelRef(version=version.version, bundle=str(reg.fetch_bundle(version, bundle_cache(endpoint.model))))
    endpoint.serve(with_champion(drop_canary(current) if current.canary else current, ref))
    with endpoint.client() as client:
        client.wait_ready(60, version=version.version)
