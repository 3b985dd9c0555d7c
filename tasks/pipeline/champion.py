"""Champion moves outside a pipeline run: an explicit approval or a rollback, from the CLI or the ``kiln_champion``
DAG. The new champion is served first, then the registry alias moves, so the alias never names a version the
endpoint lacks (as ``promote`` does within a run). The move holds the model's champion lock, so it waits for a run
between ``deploy`` and ``promote`` instead of crossing it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kiln.tasks.pipeline.endpoint import Endpoint, serve_champion
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
        ChampionMismatchError: a rollback found the alias moved outside kiln (an approval repairs that).
        ChampionLockError: a run kept the model's champion lock for longer than the wait.
    """
    import uuid

    from kiln.tasks.pipeline.champion_lock import ChampionLocks
    from kiln.tasks.tracking.registry import Registry

    reg = Registry.from_settings()
    locks = ChampionLocks.from_settings()
    try:
        with locks.held(spec.name, f"{action} by {actor} ({uuid.uuid4().hex[:8]})"):
            target = reg.version(spec.name, version or reg.rollback_target(spec.name))
            endpoint = Endpoint.of(spec)
            served = endpoint.current() is not None
            serve_champion(endpoint, target, reg)  # served first: the alias never names a version it lacks
            previous = reg.set_champion(spec.name, target.version, action=action, reason=reason, actor=actor)
    finally:
        locks.close()
    return ChampionMove(model=spec.name, champion=target.version, previous=previous.version if previous else None,
                        action=action, url=endpoint.url if served else None)
