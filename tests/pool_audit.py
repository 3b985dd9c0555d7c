"""Replaying a pool's audit history (``LeaseStore.history``) the way a lease holder would have seen it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: The events that free a lease's devices.
FREEING = ("release", "expire", "revoke")


def replay(events: Iterable[Any]) -> tuple[int, set[str]]:
    """Grants and frees in commit order: the most leases held at once, and the devices (``node/kind/id``) granted
    while another lease held them (an empty set unless the store is broken)."""
    held: dict[str, set[str]] = {}
    peak, clashes = 0, set()
    for e in events:
        devices = {f"{node}/{kind}/{d}" for node, got in e.devices.items() for kind in ("gpus", "cpus")
                   for d in got.get(kind, [])}
        if e.event == "grant":
            clashes |= devices & set().union(*held.values()) if held else set()
            held[e.lease_id] = devices
            peak = max(peak, len(held))
        elif e.event in FREEING:
            held.pop(e.lease_id, None)
    return peak, clashes
