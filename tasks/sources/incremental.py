"""Which parts a run reads: every part, or (``source.incremental``) those new since the last accepted snapshot; and
the check that the parts an Asset event announced are still there as announced.

A part is new when the last accepted snapshot's manifest has no part of the same name and ETag (``ingested_parts``:
every part whose rows that snapshot holds or, for ``new_only``, that an accepted snapshot already held). Under
``new_only`` a part rewritten under the same name is new again. Under ``append`` it is refused: the accepted rows
hold its earlier version, and appending the new one would hold both (the fix is one run with ``incremental: off``).
A part deleted from the source leaves its rows in an ``append`` snapshot.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.tasks.sources.errors import IngestError
from kiln.tasks.sources.listing import SourceListing, SourcePart

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Previous:
    """The last accepted snapshot, as incremental ingest needs it."""

    run_key: str
    manifest: Mapping[str, Any]
    snapshot: Path
    """Its ``snapshot.parquet`` (read only for ``append``)."""


@dataclass(frozen=True)
class Selection:
    """The parts this run reads, and what it builds on."""

    parts: tuple[SourcePart, ...]
    ingested: tuple[dict[str, Any], ...]
    """Every part counted as ingested once this snapshot is accepted (the next incremental run's baseline)."""
    append_to: Previous | None
    """The snapshot whose rows come first (``append``), or ``None``."""
    previous_run: str | None


def ingested_parts(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The parts a manifest counts as ingested (``ingested_parts``, else its ``parts``)."""
    return list(manifest.get("ingested_parts") or manifest.get("parts") or [])


def select_parts(listing: SourceListing, mode: str, previous: Previous | None) -> Selection:
    """The parts to read under ``source.incremental`` = ``mode``.

    Raises:
        IngestError: incremental mode and no part is new since the last accepted snapshot (nothing to ingest);
            ``append`` and a part rewritten since the accepted snapshot read it.
    """
    current = tuple(p.to_dict() for p in listing.parts)
    if mode == "off":
        return Selection(listing.parts, current, None, None)
    if previous is None:
        log.info("incremental %s: no accepted snapshot yet; reading all %d parts of %s", mode, len(listing.parts),
                 listing.uri)
        return Selection(listing.parts, current, None, None)
    if previous.manifest.get("source_uri") != listing.uri:
        log.warning("incremental %s: the last accepted snapshot (run %s) read %s, not %s; reading every part",
                    mode, previous.run_key, previous.manifest.get("source_uri"), listing.uri)
        return Selection(listing.parts, current, None, None)
    seen = ingested_parts(previous.manifest)
    known = {(p["name"], p["etag"]) for p in seen}
    new = tuple(p for p in listing.parts if (p.name, p.etag) not in known)
    if not new:
        raise IngestError(f"nothing to ingest: no part under {listing.uri} is new since the last accepted snapshot "
                          f"(run {previous.run_key}, {len(seen)} parts); add new partition files there, or set "
                          "source.incremental: off to read every part again")
    earlier = {p["name"]: p["etag"] for p in seen}
    rewritten = [p for p in new if p.name in earlier]
    if mode == "append" and rewritten:
        first = rewritten[0]
        raise IngestError(f"{listing.location(first)} was rewritten since the accepted snapshot of run "
                          f"{previous.run_key} read it (ETag {earlier[first.name]} then, {first.etag} now"
                          f"{f'; {len(rewritten) - 1} more part(s) too' if len(rewritten) > 1 else ''}): "
                          "source.incremental: append keeps the rows of the version it read, and appending this "
                          "one would hold both. Run once with source.incremental: off to read every part again, "
                          "or write corrections as new partitions")
    log.info("incremental %s: %d new part(s) of %d under %s since run %s: %s", mode, len(new), len(listing.parts),
             listing.uri, previous.run_key, ", ".join(p.name for p in new[:10]))
    names = {p.name for p in new}
    ingested = tuple([p for p in seen if p["name"] not in names] + [p.to_dict() for p in new])
    return Selection(new, tuple(sorted(ingested, key=lambda p: p["name"])),
                     previous if mode == "append" else None, previous.run_key)


def check_events(listing: SourceListing, events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check that every part an Asset event listed is still in ``listing`` with the event's ETag.

    Args:
        listing: the source as this run sees it.
        events: the extras of the Asset events that started the run (``{"uri", "parts": [{name, etag, size}]}``).

    Returns:
        The parts the events announced (what the manifest records under ``trigger``).

    Raises:
        IngestError: an announced part is gone or has another ETag (it changed after the event).
    """
    announced: list[dict[str, Any]] = []
    for event in events:
        parts = event.get("parts")
        if not isinstance(parts, list):
            continue
        uri = event.get("uri")
        if uri is not None and str(uri).rstrip("/") != listing.uri.rstrip("/"):
            log.warning("an Asset event lists parts of %s, not this source %s; not checked", uri, listing.uri)
            continue
        for item in parts:
            name, etag = str(item.get("name")), str(item.get("etag"))
            now = listing.part(name)
            if now is None:
                raise IngestError(f"{listing.location(SourcePart(name, 0, etag))} started this run (an Asset event "
                                  "listed it) but is no longer in the source: it was deleted after the event; "
                                  "the run cannot read the data that caused it. Run the pipeline again")
            if now.etag != etag:
                raise IngestError(f"{listing.location(now)} changed after the Asset event that started this run "
                                  f"(ETag {etag} in the event, {now.etag} now); the run cannot read the data "
                                  "that caused it. The watcher starts a run for the new version")
            announced.append(now.to_dict())
    if announced:
        log.info("the Asset event's %d part(s) are in the source as announced", len(announced))
    return announced
