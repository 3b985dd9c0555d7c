"""Unit tests of the canary decision: ``judge`` on statistics snapshots and ``watch_canary`` with an injected clock."""

from __future__ import annotations

from typing import Any

import pytest

from kiln.tasks.evaluation.canary import CanaryVerdict, judge, watch_canary
from kiln.tasks.spec import CanarySpec

POLICY = CanarySpec(share=0.2, min_requests=50, window_s=60, max_error_rate_increase=0.01, max_latency_ratio=2.0)


def _stats(champion: tuple[int, int, float | None], canary: tuple[int, int, float | None] | None) -> dict[str, Any]:
    """A ``/admin/stats`` body from ``(requests, errors, p99_ms)`` per variant."""

    def variant(version: str, values: tuple[int, int, float | None]) -> dict[str, Any]:
        requests, errors, p99 = values
        return {"version": version, "requests": requests, "errors": errors,
                "p50_ms": None if p99 is None else p99 / 2, "p99_ms": p99}

    return {"champion": variant("3", champion), "canary": variant("4", canary) if canary else None,
            "since": "2026-11-23T10:00:00Z"}


@pytest.mark.parametrize(("stats", "promote", "reason"), [
    (_stats((400, 0, 12.0), (100, 0, 14.0)), True, "healthy over 100 requests"),
    # 1% champion errors + 1 point allowed; 3 in 60 is 5%
    (_stats((400, 4, 12.0), (60, 3, 12.0)), False, "error rate 5.00%"),
    # the allowed increase is on top of the champion's own error rate: 2% vs 1% + 1 point
    (_stats((400, 4, 12.0), (50, 1, 12.0)), True, "healthy"),
    (_stats((400, 0, 10.0), (80, 0, 45.0)), False, "too slow: p99 45.0 ms is more than 2x"),
    # 4x slower, but 1.2 ms vs 0.3 ms is below the 5 ms noise floor
    (_stats((400, 0, 0.3), (80, 0, 1.2)), True, "healthy"),
    # 25% slower and 15 ms above: over the floor but within the ratio
    (_stats((400, 0, 60.0), (80, 0, 75.0)), True, "healthy"),
    # 5 errors in 10 requests already exceed 1% of 50 requests: no need to wait for 40 more
    (_stats((40, 0, 10.0), (10, 5, 10.0)), False, "errors in its first 10 requests already exceed"),
    # a single error among 10 is still within what 50 requests could absorb at a 1% champion rate + 1 point
    (_stats((100, 1, 10.0), (10, 1, 10.0)), None, None),
    (_stats((100, 0, 10.0), (49, 0, 10.0)), None, None),
    (_stats((0, 0, None), (0, 0, None)), None, None),
    # the champion saw no traffic: nothing to compare latency with, errors judged against 0%
    (_stats((0, 0, None), (50, 0, 80.0)), True, "healthy"),
    (_stats((100, 0, 10.0), None), False, "no canary"),
], ids=["healthy", "error_rate", "error_rate_relative_to_champion", "slow", "latency_below_floor",
        "latency_within_ratio", "early_rollback", "one_error_keeps_watching", "too_little_traffic",
        "no_traffic", "idle_champion", "canary_gone"])
def test_judge(stats: dict[str, Any], promote: bool | None, reason: str | None) -> None:
    verdict = judge(POLICY, stats)

    if promote is None:
        assert verdict is None
    else:
        assert verdict is not None and verdict.promote is promote
        assert reason in verdict.reason
        assert verdict.stats is stats


class _ScriptedServer:
    """Stands in for the server's ``/admin/stats``: yields snapshots in order, repeating the last one."""

    def __init__(self, snapshots: list[dict[str, Any]]):
        self.snapshots = snapshots
        self.calls = 0

    def stats(self) -> dict[str, Any]:
        self.calls += 1
        return self.snapshots[min(self.calls, len(self.snapshots)) - 1]


class _FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_too_little_traffic_rolls_back_at_window_end() -> None:
    policy = CanarySpec(min_requests=50, window_s=10)
    server = _ScriptedServer([_stats((20, 0, 10.0), (5, 0, 10.0)), _stats((60, 0, 10.0), (12, 0, 10.0))])
    clock = _FakeClock()

    verdict = watch_canary(server, policy, poll_s=3, clock=clock, sleep=clock.sleep)

    assert not verdict.promote
    assert "not enough traffic" in verdict.reason and "12 of the 50 requests" in verdict.reason
    # polls at 0, 3, 6, 9 and a last one exactly at the window's end
    assert clock.sleeps == [3, 3, 3, 1] and server.calls == 5


def test_watch_returns_as_soon_as_judge_decides() -> None:
    server = _ScriptedServer([_stats((20, 0, 10.0), (5, 0, 10.0)), _stats((100, 0, 10.0), (30, 0, 10.0)),
                              _stats((300, 0, 10.0), (70, 0, 11.0))])
    clock = _FakeClock()

    verdict = watch_canary(server, POLICY, clock=clock, sleep=clock.sleep)

    assert verdict.promote and server.calls == 3 and clock.now == 1002.0


def test_verdict_to_dict_is_json_ready() -> None:
    stats = _stats((10, 0, 1.0), (10, 0, 1.0))

    assert CanaryVerdict(False, "why", stats).to_dict() == {"promote": False, "reason": "why", "stats": stats}


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"share": 0}, "share"), ({"share": 1.0}, "share"), ({"min_requests": 0}, "min_requests"),
    ({"window_s": 0}, "window_s"), ({"max_error_rate_increase": -0.1}, "max_error_rate_increase"),
    ({"max_latency_ratio": 0.5}, "max_latency_ratio"),
], ids=["share_zero", "share_one", "min_requests", "window", "error_increase", "latency_ratio"])
def test_the_spec_rejects_bad_canary_settings(kwargs: dict[str, Any], field: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=field):
        CanarySpec(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"poll_s": 0}, "poll_s must be positive"), ({"poll_s": 400}, "at most the window"),
    ({"latency_floor_ms": -1}, "latency_floor_ms must be >= 0"),
], ids=["poll_zero", "poll_over_window", "latency_floor"])
def test_watching_rejects_bad_timing(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        watch_canary(_ScriptedServer([]), POLICY, **kwargs)
