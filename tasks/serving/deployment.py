"""The deployment file: which bundles a model server serves, as champion and (optionally) canary.

One JSON file per served model is the source of truth; the deploy steps rewrite it (atomically, temporary name then
rename) and ask the server to reload, and a server that restarts reads the same file::

    {"model": "penguins_species",
     "champion": {"version": "3", "bundle": "/abs/path/to/bundle"},
     "canary": {"version": "4", "bundle": "/abs/path", "share": 0.2},
     "capture": {"share": 0.1},
     "updated_at": "2026-11-23T10:00:00Z"}

``capture`` is optional (files from before it load with the default share :data:`DEFAULT_CAPTURE_SHARE`): the
share of answered requests the server records for monitoring (:mod:`.capture`), 0 to record none. ``replicas``
is optional too (:class:`~.scaling.ReplicaSettings`): with it the model is served by a replica set behind a load
balancer (:mod:`kiln.tasks.fleet`), without it by one server process.

The helpers return new :class:`Deployment` values (they are frozen) with ``updated_at`` set to now.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kiln.tasks.serving.scaling import ReplicaSettings
from kiln.tasks.storage.artifacts import atomic_write_bytes

#: Share of answered requests captured when the deployment file says nothing (the issue's "e.g. 10 %").
DEFAULT_CAPTURE_SHARE = 0.1
_FIELDS = ("model", "champion", "canary", "capture", "replicas", "updated_at")


class DeploymentError(ValueError):
    """A deployment file that cannot be read or holds invalid fields; the message names the file and the fix."""


class DeploymentNotFoundError(DeploymentError, FileNotFoundError):
    """The deployment file does not exist."""


def utc_now() -> str:
    """The current time as ISO 8601 UTC with a ``Z`` suffix, to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _require_text(value: Any, field: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field} must be a non-empty string, found {value!r}")


@dataclass(frozen=True)
class ModelRef:
    """One served model version and the bundle folder it is loaded from."""

    version: str
    """The registry version (e.g. ``"3"``), reported in every response."""
    bundle: str
    """Absolute path of the bundle folder (``kiln.tasks.bundle.load.load_bundle`` loads it)."""

    def __post_init__(self) -> None:
        _require_text(self.version, "version")
        _require_text(self.bundle, "bundle")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"version": self.version, "bundle": self.bundle}


@dataclass(frozen=True)
class Canary:
    """A candidate version that receives ``share`` of the requests while it is judged."""

    version: str
    """The candidate's registry version."""
    bundle: str
    """Absolute path of the candidate's bundle folder."""
    share: float
    """Probability that a request is routed to the canary, in (0, 1]."""

    def __post_init__(self) -> None:
        _require_text(self.version, "canary.version")
        _require_text(self.bundle, "canary.bundle")
        if isinstance(self.share, bool) or not isinstance(self.share, int | float) \
                or not math.isfinite(self.share) or not 0 < self.share <= 1:
            raise ValueError(f"canary.share must be a number in (0, 1] (the fraction of requests the canary "
                             f"receives), found {self.share!r}")

    @property
    def ref(self) -> ModelRef:
        """The canary's version and bundle as a :class:`ModelRef` (e.g. to promote it)."""
        return ModelRef(self.version, self.bundle)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"version": self.version, "bundle": self.bundle, "share": self.share}


@dataclass(frozen=True)
class CaptureSettings:
    """How much of the served traffic the model server records for monitoring (:mod:`.capture`)."""

    share: float = DEFAULT_CAPTURE_SHARE
    """Probability that an answered request is captured, in [0, 1]; 0 turns capture off."""

    def __post_init__(self) -> None:
        if isinstance(self.share, bool) or not isinstance(self.share, int | float) \
                or not math.isfinite(self.share) or not 0 <= self.share <= 1:
            raise ValueError(f"capture.share must be a number in [0, 1] (the fraction of answered requests "
                             f"recorded for monitoring, 0: none), found {self.share!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"share": self.share}

    @classmethod
    def from_dict(cls, data: Any) -> CaptureSettings:
        """Parse ``{"share": 0.1}`` (every key optional).

        Raises:
            ValueError: not an object, an unknown key or an invalid share; the message names the field.
        """
        if not isinstance(data, dict):
            raise ValueError(f'capture must be an object such as {{"share": 0.1}}, found {data!r}')
        unknown = sorted(set(data) - {"share"})
        if unknown:
            raise ValueError(f"capture.{unknown[0]} is not a known field (allowed: share)")
        return cls(**data)


@dataclass(frozen=True)
class Deployment:
    """What one model server serves."""

    model: str
    """The served model's name (the pipeline / registry name), reported in every response."""
    champion: ModelRef
    """The version that answers every request not routed to the canary (and every canary failure)."""
    canary: Canary | None = None
    """The candidate under observation, if any."""
    updated_at: str = ""
    """ISO 8601 time of the last change (informational)."""
    capture: CaptureSettings = CaptureSettings()
    """What share of the answered requests is recorded for monitoring."""
    replicas: ReplicaSettings | None = None
    """The replica set and its autoscaling; ``None``: one server process, no balancer."""

    def __post_init__(self) -> None:
        _require_text(self.model, "model")
        if not isinstance(self.champion, ModelRef):
            raise TypeError(f"champion must be a ModelRef, found {type(self.champion).__name__}")
        if self.canary is not None and not isinstance(self.canary, Canary):
            raise TypeError(f"canary must be a Canary or None, found {type(self.canary).__name__}")
        if not isinstance(self.capture, CaptureSettings):
            raise TypeError(f"capture must be a CaptureSettings, found {type(self.capture).__name__}")
        if self.replicas is not None and not isinstance(self.replicas, ReplicaSettings):
            raise TypeError(f"replicas must be a ReplicaSettings or None, found {type(self.replicas).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the file layout)."""
        out = {"model": self.model, "champion": self.champion.to_dict(),
               "canary": self.canary.to_dict() if self.canary else None, "capture": self.capture.to_dict(),
               "updated_at": self.updated_at}
        if self.replicas is not None:  # absent, not null: files without replicas read as before
            out["replicas"] = self.replicas.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Deployment:
        """Parse the file layout.

        Raises:
            ValueError: a missing or invalid field; the message names it.
        """
        if not isinstance(data, dict):
            raise ValueError(f"the top level must be a JSON object, found {type(data).__name__}")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ValueError(f"the field '{unknown[0]}' is not known (allowed: {', '.join(_FIELDS)})")
        for key in ("model", "champion"):
            if key not in data:
                raise ValueError(f"the field '{key}' is missing")
        champion, canary = data["champion"], data.get("canary")
        if not isinstance(champion, dict) or set(champion) - {"version", "bundle"} \
                or not {"version", "bundle"} <= set(champion):
            raise ValueError(f"champion must be an object with exactly 'version' and 'bundle', found {champion!r}")
        if canary is not None and (not isinstance(canary, dict) or set(canary) != {"version", "bundle", "share"}):
            raise ValueError(f"canary must be null or an object with 'version', 'bundle' and 'share', "
                             f"found {canary!r}")
        return cls(model=data["model"], champion=ModelRef(**champion),
                   canary=Canary(**canary) if canary is not None else None,
                   updated_at=str(data.get("updated_at") or ""),
                   capture=CaptureSettings.from_dict(data["capture"]) if "capture" in data else CaptureSettings(),
                   replicas=ReplicaSettings.from_dict(data["replicas"]) if data.get("replicas") is not None else None)


def read_deployment(path: str | Path) -> Deployment:
    """Read and validate a deployment file.

    Raises:
        DeploymentNotFoundError: the file does not exist (a ``DeploymentError`` and a ``FileNotFoundError``).
        DeploymentError: the file is not JSON or a field is invalid.
    """
    path = Path(path)
    if not path.is_file():
        raise DeploymentNotFoundError(f"deployment file {path} does not exist; write it with "
                                "kiln.tasks.serving.deployment.write_deployment (the deploy step does)")
    try:
        return Deployment.from_dict(json.loads(path.read_bytes()))
    except json.JSONDecodeError as exc:
        raise DeploymentError(f"deployment file {path} is not valid JSON ({exc}); rewrite it") from None
    except (TypeError, ValueError) as exc:
        raise DeploymentError(f"deployment file {path}: {exc}") from None


def write_deployment(path: str | Path, deployment: Deployment) -> Path:
    """Write ``deployment`` to ``path`` atomically (temporary name, then rename), so a server never reads half.

    Returns:
        The path written.
    """
    data = json.dumps(deployment.to_dict(), indent=2) + "\n"
    return atomic_write_bytes(path, data.encode())


def with_champion(deployment: Deployment, ref: ModelRef) -> Deployment:
    """``deployment`` serving ``ref`` as champion; the canary (if any) is kept."""
    return replace(deployment, champion=ref, updated_at=utc_now())


def with_canary(deployment: Deployment, ref: ModelRef, share: float) -> Deployment:
    """``deployment`` with ``ref`` as canary receiving ``share`` of the requests (replacing any canary).

    Raises:
        ValueError: ``share`` outside (0, 1].
    """
    return replace(deployment, canary=Canary(ref.version, ref.bundle, share), updated_at=utc_now())


def promote_canary(deployment: Deployment) -> Deployment:
    """The canary becomes the champion and there is no canary any more.

    Raises:
        ValueError: the deployment has no canary.
    """
    if deployment.canary is None:
        raise ValueError(f"deployment of {deployment.model} has no canary to promote")
    return replace(deployment, champion=deployment.canary.ref, canary=None, updated_at=utc_now())


def drop_canary(deployment: Deployment) -> Deployment:
    """``deployment`` without its canary (a rollback); unchanged champion."""
    return replace(deployment, canary=None, updated_at=utc_now())
