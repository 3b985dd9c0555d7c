"""The replica settings, the autoscaling policy, the balancer's configuration and the fleet's summed figures."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kiln.tasks.fleet.admin import aggregate_stats
from kiln.tasks.fleet.haproxy import haproxy_binary, render_config
from kiln.tasks.fleet.leases import check_capacity
from kiln.tasks.fleet.replicas import weights
from kiln.tasks.pools.inventory import load_inventory
from kiln.tasks.serving.deployment import Deployment, ModelRef
from kiln.tasks.serving.scaling import Autoscaler, ReplicaSettings


@pytest.mark.parametrize(("data", "message"), [
    ({"min": 3, "max": 2}, r"replicas.min \(3\) is above replicas.max \(2\)"),
    ({"min": 0}, r"replicas.min and replicas.max must be in \[1, 32\]"),
    ({"max": 33}, r"must be in \[1, 32\]"),
    ({"min": 1.5}, r"replicas.min must be a whole number"),
    ({"target_in_flight": 0}, r"replicas.target_in_flight must be a number"),
    ({"scale_down_s": float("nan")}, r"replicas.scale_down_s"),
    ({"pool": " "}, r"replicas.pool must name a resource pool"),
    ({"mx": 2}, r"replicas.mx is not a known field"),
    ([1, 2], r"replicas must be an object"),
], ids=["min-above-max", "zero", "too-many", "fraction", "target", "nan-window", "blank-pool", "typo", "list"])
def test_bad_replica_settings_name_the_field(data, message):
    with pytest.raises(ValueError, match=message):
        ReplicaSettings.from_dict(data)


def test_the_deployment_file_carries_replicas_and_an_old_file_has_none():
    settings = ReplicaSettings(min=1, max=3, target_in_flight=4)
    dep = Deployment("m", ModelRef("1", "/b"), replicas=settings)
    assert Deployment.from_dict(dep.to_dict()).replicas == settings
    old = Deployment("m", ModelRef("1", "/b")).to_dict()
    assert "replicas" not in old and Deployment.from_dict(old).replicas is None


def test_scale_up_waits_for_the_up_window_and_takes_the_smallest_ask():
    scaler = Autoscaler(ReplicaSettings(min=1, max=4, target_in_flight=4, scale_up_s=2, scale_down_s=10))
    assert scaler.decide(0.0, 16, 1) == 1  # asks for 4, but not yet for 2 s
    assert scaler.decide(1.0, 9, 1) == 1   # asks for 3
    assert scaler.decide(2.0, 16, 1) == 3  # over [0, 2] every ask was >= 3: the smallest wins
    assert scaler.decide(3.0, 40, 3) == 3  # capped at max 4, but the window still holds the ask for 3
    assert scaler.decide(4.0, 40, 3) == 4


def test_a_short_spike_or_dip_does_not_flap():
    scaler = Autoscaler(ReplicaSettings(min=1, max=4, target_in_flight=4, scale_up_s=3, scale_down_s=5))
    current = 2
    for t, load in enumerate([8, 8, 30, 8, 8, 0, 8, 8, 8, 0, 8]):
        current = scaler.decide(float(t), load, current)
        assert current == 2, (t, load)


def test_scale_in_waits_for_the_down_window_and_takes_the_largest_ask():
    scaler = Autoscaler(ReplicaSettings(min=1, max=4, target_in_flight=4, scale_up_s=1, scale_down_s=4))
    decisions = [scaler.decide(float(t), load, 3) for t, load in enumerate([12, 4, 8, 0, 0, 0, 0])]
    # t=4 sees [12@0 .. 0@4]: the largest ask is still 3; at t=5 the window holds 4 (t=1) and 8 asks 2.
    assert decisions == [3, 3, 3, 3, 3, 2, 2]
    assert scaler.decide(7.0, 0, 2) == 1


def test_min_and_max_bound_the_count_whatever_the_load():
    scaler = Autoscaler(ReplicaSettings(min=2, max=3, target_in_flight=1, scale_up_s=0, scale_down_s=0))
    assert scaler.decide(0.0, 0, 2) == 2
    assert scaler.decide(1.0, 100, 2) == 3
    assert scaler.decide(2.0, 0, 5) == 3  # above max (a lowered max): back within bounds at once


def test_the_balancer_configuration_is_valid_for_haproxy(tmp_path: Path):
    config = tmp_path / "haproxy.cfg"
    config.write_text(render_config(host="127.0.0.1", port=18080, slots=3, admin_port=18081,
                                    socket_path=tmp_path / "admin.sock"))
    text = config.read_text()
    assert text.count(" disabled check") == 3 and "option httpchk GET /ready" in text
    check = subprocess.run([haproxy_binary(), "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_fleet_adds_the_replicas_figures_up():
    bodies = [{"since": 10, "champion": {"version": "2", "requests": 5, "errors": 1, "p50_ms": 1.0, "p99_ms": 4.0},
               "canary": None},
              {"since": 12, "champion": {"version": "2", "requests": 7, "errors": 0, "p50_ms": 2.0, "p99_ms": 3.0},
               "canary": {"version": "3", "requests": 2, "errors": 0, "p50_ms": None, "p99_ms": None}}]
    assert aggregate_stats(bodies) == {
        "since": 10, "replicas": 2,
        "champion": {"version": "2", "requests": 12, "errors": 1, "p50_ms": 2.0, "p99_ms": 4.0},
        "canary": {"version": "3", "requests": 2, "errors": 0, "p50_ms": None, "p99_ms": None}}
    assert aggregate_stats([]) is None


def test_a_pool_too_small_for_max_replicas_is_refused_naming_the_fix(tmp_path: Path):
    (tmp_path / "pools.yaml").write_text("pools: {serve: {nodes: [{name: n1, cpus: 4, memory: 8GiB}]}}")
    inventory = load_inventory(tmp_path / "pools.yaml")
    check_capacity(inventory, ReplicaSettings(max=2, cpus=2, pool="serve"))
    with pytest.raises(ValueError, match=r"replicas.max is 3 but pool 'serve' holds at most 2"):
        check_capacity(inventory, ReplicaSettings(max=3, cpus=2, pool="serve"))
    with pytest.raises(ValueError, match=r"replicas.pool 'gpu' is not a pool"):
        check_capacity(inventory, ReplicaSettings(pool="gpu"))


@pytest.mark.parametrize(("share", "champions", "canaries", "expected"), [
    (0.2, 2, 1, (102, 51)),   # the canary set's weight is 1/5 of the total: 51 / (2 * 102 + 51)
    (0.5, 1, 1, (128, 128)),
    (0.0, 3, 0, (85, 0)),     # no canary: the champions share everything
    (0.3, 2, 0, (128, 0)),    # the canary's replica not ready yet: nothing is sent to it
    (0.3, 0, 1, (0, 256)),    # no champion replica ready: the canary takes all
    (0.001, 1, 1, (256, 1)),  # a tiny share still keeps the canary in rotation
], ids=["fifth", "half", "none", "canary-starting", "champions-starting", "tiny"])
def test_the_canary_share_becomes_weights_across_the_two_sets(share, champions, canaries, expected):
    assert weights(share, champions, canaries) == expected
