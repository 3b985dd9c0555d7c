"""Which model a scoring run uses: the champion or a named registry version, resolved once when the run starts and
recorded with its staged input, so that every partition of the run scores with the same version even if the
champion moves meanwhile."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.tasks.scoring.config import CHAMPION, ScoringError

if TYPE_CHECKING:
    from kiln.tasks.tracking.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoringModel:
    """The model version a run scores with, and where its bundle is."""

    version: str
    bundle: str
    """The bundle folder (on the machine that resolved it; a partition elsewhere fetches the version again)."""
    source: str = ""
    """The registry version's source (``""`` for a bundle given directly)."""
    champion: bool = False
    """Whether the run asked for the champion."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the staged ``model.json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoringModel:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


def resolve_model(pipeline: str, version: str, registry: Registry | None = None) -> ScoringModel:
    """The registered version ``version`` (``champion``: the version the alias names now) of ``pipeline``'s model,
    its bundle fetched into the pipeline's bundle cache.

    Raises:
        ScoringError: no such version, or no champion yet; the message lists the versions there are.
        ChampionMismatchError: the champion alias was moved outside kiln.
    """
    from kiln.tasks.pipeline.endpoint import bundle_cache
    from kiln.tasks.tracking.registry import Registry, RegistryError

    registry = registry or Registry.from_settings()
    if version == CHAMPION:
        info = registry.champion(pipeline)
        if info is None:
            raise ScoringError(f"Param 'version': model '{pipeline}' has no champion yet "
                               f"(versions: {_known(registry, pipeline)}); run the pipeline until a version passes "
                               "its gate, or name a version")
    else:
        try:
            info = registry.version(pipeline, version)
        except RegistryError:
            raise ScoringError(f"Param 'version': model '{pipeline}' has no version {version!r} (versions: "
                               f"{_known(registry, pipeline)}); give one of them, or 'champion'") from None
    bundle = registry.fetch_bundle(info, bundle_cache(pipeline))
    log.info("scoring with %s version %s%s (bundle %s)", pipeline, info.version,
             " (the champion)" if version == CHAMPION else "", bundle)
    return ScoringModel(version=info.version, bundle=str(bundle), source=info.source, champion=version == CHAMPION)


def _known(registry: Registry, pipeline: str) -> str:
    versions = registry.versions(pipeline)
    return ", ".join(v.version + (f" ({', '.join(v.aliases)})" if v.aliases else "") for v in versions) or "none"


def local_bundle(model: ScoringModel, pipeline: str, registry: Registry | None = None) -> Path:
    """The bundle folder of ``model`` on this machine: its recorded folder, or the version fetched again."""
    folder = Path(model.bundle)
    if folder.is_dir():
        return folder
    from kiln.tasks.pipeline.endpoint import bundle_cache
    from kiln.tasks.tracking.registry import Registry

    registry = registry or Registry.from_settings()
    return registry.fetch_bundle(registry.version(pipeline, model.version), bundle_cache(pipeline))
