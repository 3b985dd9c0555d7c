"""Canary analysis (``verify`` of a ``canary`` deployment): decide from the model server's live statistics
whether a candidate model may replace the champion.

The server routes a share of the traffic to the canary and counts requests, errors and latencies per variant
since its last reload (``GET /admin/stats``). :func:`judge` is the pure decision on one such snapshot;
:func:`watch_canary` polls the server until the judgement is made or the observation window ends.

The canary is rolled back when its error rate exceeds the champion's by more than ``max_error_rate_increase``,
or when its p99 latency is both ``max_latency_ratio`` times the champion's and more than ``LATENCY_FLOOR_MS``
above it (sub-millisecond p99s differ by large ratios for no reason a user would notice). A canary whose errors
already exceed what ``min_requests`` requests could tolerate is rolled back at once, without waiting for the
remaining traffic.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kiln.tasks.spec import CanarySpec

log = logging.getLogger(__name__)


class StatsSource(Protocol):
    """What :func:`watch_canary` needs from a client: ``GET /admin/stats`` (see ``ServingClient.stats``)."""

    def stats(self) -> dict[str, Any]: ...


#: p99 differences below this many milliseconds are noise and never cause a rollback.
LATENCY_FLOOR_MS = 5.0


@dataclass(frozen=True)
class CanaryVerdict:
    """The outcome of a canary: promote it or roll it back, why, and the statistics it was judged on."""

    promote: bool
    reason: str
    stats: dict[str, Any]
    """The ``/admin/stats`` snapshot the decision was made on."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (e.g. for XCom)."""
        return {"promote": self.promote, "reason": self.reason, "stats": self.stats}


def _counts(variant: dict[str, Any]) -> tuple[int, int]:
    return int(variant.get("requests") or 0), int(variant.get("errors") or 0)


def _error_rate(variant: dict[str, Any]) -> float:
    requests, errors = _counts(variant)
    return errors / requests if requests else 0.0


def _p99(variant: dict[str, Any]) -> float | None:
    value = variant.get("p99_ms")
    return float(value) if value is not None and math.isfinite(float(value)) else None


def judge(policy: CanarySpec, stats: dict[str, Any], latency_floor_ms: float = LATENCY_FLOOR_MS
          ) -> CanaryVerdict | None:
    """Decide on one statistics snapshot.

    Args:
        policy: the spec's ``deployment.canary`` thresholds.
        latency_floor_ms: p99 differences up to this are never a reason to roll back.
        stats: the body of ``GET /admin/stats``: ``{"champion": {"requests", "errors", "p50_ms", "p99_ms", ...},
            "canary": {...} | None, "since": ...}``.

    Returns:
        ``None`` to keep watching (too little canary traffic and no early failure), else the verdict.
    """
    champion, canary = stats.get("champion") or {}, stats.get("canary")
    if not canary:
        return CanaryVerdict(False, "the server reports no canary (the deployment changed while it was watched)",
                             stats)
    requests, errors = _counts(canary)
    allowed_rate = _error_rate(champion) + policy.max_error_rate_increase
    version = canary.get("version", "?")
    if requests < policy.min_requests:
        # Even if every remaining request up to min_requests succeeded, the rate would stay too high.
        if errors > allowed_rate * policy.min_requests:
            return CanaryVerdict(False, f"canary {version} error rate too high: {errors} errors in its first "
                                        f"{requests} requests already exceed the {allowed_rate:.2%} allowed over "
                                        f"{policy.min_requests} requests (champion {_error_rate(champion):.2%} + "
                                        f"{policy.max_error_rate_increase:.2%})", stats)
        return None
    rate = errors / requests
    if rate > allowed_rate:
        return CanaryVerdict(False, f"canary {version} error rate {rate:.2%} ({errors}/{requests}) exceeds the "
                                    f"champion's {_error_rate(champion):.2%} by more than "
                                    f"{policy.max_error_rate_increase:.2%}", stats)
    slow = _slow_reason(policy, champion, canary, latency_floor_ms)
    if slow:
        return CanaryVerdict(False, f"canary {version} is too slow: {slow}", stats)
    return CanaryVerdict(True, f"canary {version} healthy over {requests} requests: error rate {rate:.2%} "
                               f"(champion {_error_rate(champion):.2%}), p99 {_fmt_ms(_p99(canary))} "
                               f"(champion {_fmt_ms(_p99(champion))})", stats)


def _slow_reason(policy: CanarySpec, champion: dict[str, Any], canary: dict[str, Any],
                 latency_floor_ms: float) -> str | None:
    """Why the canary's p99 latency is unacceptable, or ``None``."""
    canary_p99, champion_p99 = _p99(canary), _p99(champion)
    if canary_p99 is None or champion_p99 is None:
        return None  # nothing to compare with (e.g. the champion saw no traffic)
    if canary_p99 - champion_p99 <= latency_floor_ms:
        return None
    if canary_p99 > policy.max_latency_ratio * champion_p99:
        return (f"p99 {canary_p99:.1f} ms is more than {policy.max_latency_ratio:g}x the champion's "
                f"{champion_p99:.1f} ms")
    return None


def _fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def watch_canary(client: StatsSource, policy: CanarySpec, *, poll_s: float = 1.0,
                 latency_floor_ms: float = LATENCY_FLOOR_MS, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> CanaryVerdict:
    """Poll the server's statistics until :func:`judge` decides or ``policy.window_s`` has passed.

    Args:
        client: a ``ServingClient`` (anything with ``stats()``) of the server running the canary.
        policy: the spec's ``deployment.canary``: thresholds and window.
        poll_s: seconds between two reads of the statistics, in ``(0, window_s]``.
        latency_floor_ms: p99 differences up to this are never a reason to roll back (``>= 0``).
        clock: monotonic seconds (injectable for tests).
        sleep: waits between polls (injectable for tests).

    Returns:
        The verdict; at the end of the window without enough canary traffic, a rollback saying so.

    Raises:
        ValueError: ``poll_s`` or ``latency_floor_ms`` out of range.
        ServingError: the statistics could not be read.
    """
    if not 0 < poll_s <= policy.window_s:
        raise ValueError(f"poll_s must be positive and at most the window ({policy.window_s:g} s), found {poll_s!r}")
    if not latency_floor_ms >= 0:
        raise ValueError(f"latency_floor_ms must be >= 0 ms, found {latency_floor_ms!r}")
    start = clock()
    while True:
        stats = client.stats()
        verdict = judge(policy, stats, latency_floor_ms)
        if verdict is not None:
            log.info("canary verdict: %s (%s)", "promote" if verdict.promote else "roll back", verdict.reason)
            return verdict
        elapsed = clock() - start
        requests, errors = _counts(stats.get("canary") or {})
        if elapsed >= policy.window_s:
            reason = (f"not enough traffic: the canary served {requests} of the {policy.min_requests} requests "
                      f"needed within the {policy.window_s:g} s window")
            log.warning("canary verdict: roll back (%s)", reason)
            return CanaryVerdict(False, reason, stats)
        log.info("canary %d/%d requests, %d errors, %.0f/%g s", requests, policy.min_requests, errors, elapsed,
                 policy.window_s)
        sleep(min(poll_s, policy.window_s - elapsed))
