"""The last accepted snapshot of a pipeline: the snapshot that last passed ``validate``, with its data profile.

``validate`` compares each new snapshot's profile with the accepted one (:mod:`kiln.tasks.features.profile`) and,
when the snapshot passes, publishes it as the new accepted one under ``<pipeline>/_accepted``. The key cannot be a
run's: run keys never start with ``_`` (:func:`kiln.tasks.storage.artifacts.run_key`). Incremental ingest reads the
same record as "the last successful run": its manifest lists the parts it read, and its snapshot lies at
``<run_key>/ingest/snapshot.parquet``.

The record is published through the store's writer, so a reader sees the previous record or the new one, whole.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from kiln.tasks.features.profile import PROFILE_FILE
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.storage.artifacts import ArtifactStore, read_json, write_json

if TYPE_CHECKING:
    from kiln.tasks.features.profile import DataProfile

log = logging.getLogger(__name__)

#: The store key of a pipeline's accepted record, below ``<pipeline>/``.
ACCEPTED = "_accepted"
ACCEPTED_FILE = "accepted.json"


@dataclass(frozen=True)
class Accepted:
    """The last snapshot that passed ``validate``."""

    run_key: str
    """The run that took it (``<pipeline>/<run id>``); its snapshot is ``<run_key>/ingest/snapshot.parquet``."""
    manifest: dict[str, Any]
    """The ingest manifest of that snapshot, as ``ingest`` wrote it."""
    profile: dict[str, Any] = field(default_factory=dict)
    """Its data profile (:meth:`kiln.tasks.features.profile.DataProfile.to_dict`)."""
    accepted_at: str = ""
    """When ``validate`` accepted it (ISO 8601, UTC)."""


def accepted_key(pipeline: str) -> str:
    """The store key of ``pipeline``'s accepted record."""
    return f"{pipeline}/{ACCEPTED}"


def read_accepted(store: ArtifactStore, pipeline: str) -> Accepted | None:
    """The last accepted snapshot of ``pipeline``, or ``None`` when none has passed ``validate`` yet.

    Args:
        store: the artifact store of the runs.
        pipeline: the pipeline's name.

    Returns:
        The record, or ``None``.

    Raises:
        ValueError: the published record is damaged (it names the key to delete to start over).
    """
    key = accepted_key(pipeline)
    if not store.exists(key):
        return None
    folder = store.path(key)
    try:
        record = read_json(folder / ACCEPTED_FILE)
        profile = read_json(folder / PROFILE_FILE)
        return Accepted(run_key=str(record["run_key"]), manifest=dict(record["manifest"]), profile=dict(profile),
                        accepted_at=str(record.get("accepted_at", "")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"the accepted snapshot record {store.uri(key)} is damaged ({exc}); delete that folder "
                         "and the next run that passes validate records a new one") from None


def publish_accepted(ctx: RunContext, manifest: Mapping[str, Any],
                     profile: DataProfile | Mapping[str, Any]) -> Accepted:
    """Record this run's snapshot as its pipeline's last accepted one, replacing the previous record atomically.

    Args:
        ctx: the run whose snapshot passed ``validate``.
        manifest: the snapshot's ingest manifest.
        profile: the snapshot's data profile (or its dict form).

    Returns:
        The record as published.
    """
    profile_dict = dict(profile) if isinstance(profile, Mapping) else profile.to_dict()
    accepted = Accepted(run_key=ctx.run_key, manifest=dict(manifest), profile=profile_dict,
                        accepted_at=datetime.now(UTC).isoformat())
    key = accepted_key(ctx.spec.name)
    with ctx.store.writer(key) as out:
        write_json(out / ACCEPTED_FILE, {"run_key": accepted.run_key, "manifest": accepted.manifest,
                                         "accepted_at": accepted.accepted_at})
        write_json(out / PROFILE_FILE, profile_dict)
    log.info("accepted snapshot of %s (%s rows, sha256 %s) recorded at %s", ctx.run_key, manifest.get("rows"),
             str(manifest.get("sha256", ""))[:12], ctx.store.uri(key))
    return accepted
