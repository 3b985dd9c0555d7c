"""Champion moves outside a pipeline run: an explicit approval or a rollback, from the CLI or the ``kiln_champion``
DAG. The new champion is served first, then the registry alias moves, so the alias never names a version the
endpoint lacks (as ``promote`` does within a run)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kiln.tasks.pipeline.endpoint import Endpoint, bundle_cache
from kiln.tasks.spec import PipelineSpec


@dataclass(frozen=True)
class ChampionMove:
    """One move of the ``champion`` alias outside a run."""

    model: str
    champion: str
    previous: str | None
    action: str
    url: str | None
    """Where the new champion is served; ``None`` when the model is not being served."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the ``kiln_champion`` task's XCom)."""
        return asdict(self)


def set_champion(spec: PipelineSpec, version: str | None, *, action: str, reason: str,
                 actor: str) -> ChampionMove:
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
    from kiln.tasks.tracking.registry import Registry

    reg = Registry.from_settings()
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
    return ChampionMove(model=spec.name, champion=target.version, previous=previous.version if previous else None,
                        action=action, url=endpoint.url if current is not None else None)
