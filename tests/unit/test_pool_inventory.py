"""The pools inventory: the YAML format (its documented example included), discovery of this machine, and errors
that name the file, the field and the fix."""

from __future__ import annotations

import os
import stat
import textwrap
from pathlib import Path

import pytest

from kiln.tasks.pools import discovery
from kiln.tasks.pools import inventory as inv
from kiln.tasks.pools.discovery import discover_memory, parse_nvidia_smi
from kiln.tasks.pools.inventory import DEFAULT_TEAM, Inventory, InventoryError, discover_local, load_inventory

GiB = 1024**3

EXAMPLE = """
pools:
  gpu:
    placement: spread
    nodes:
      - name: g1
        address: 10.0.0.1
        docker_url: tcp://10.0.0.1:2376
        cpus: 4
        memory: 64GiB
        gpus:
          - {index: 1, memory: 40GiB, model: A100}
          - {index: 0, uuid: GPU-aaaa, memory: 80GiB}
      - {name: g2, cpus: [8, 9, 2], memory: 1000000}
  cpu:
    nodes:
      - {name: c1, cpus: 2, memory: 512MiB}
teams:
  research: {priority: 10, quota: {gpus: 8, cpus: 64, memory: 1TiB}}
  batch: {}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pools.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_example_file_loads_with_devices_sizes_and_teams(tmp_path: Path) -> None:
    got = load_inventory(write(tmp_path, EXAMPLE))
    gpu = got.pools["gpu"]
    assert gpu.placement == "spread" and got.pools["cpu"].placement == "pack"
    g1 = gpu.node("g1")
    assert (g1.address, g1.docker_url, g1.cpus) == ("10.0.0.1", "tcp://10.0.0.1:2376", (0, 1, 2, 3))
    assert g1.memory == 64 * GiB
    # Sorted by index; the id is the UUID when known (CUDA's own order can differ from nvidia-smi's), else the index.
    assert [(g.id, g.index, g.memory, g.model) for g in g1.gpus] == [("GPU-aaaa", 0, 80 * GiB, ""),
                                                                      ("1", 1, 40 * GiB, "A100")]
    g2 = gpu.node("g2")
    assert (g2.address, g2.cpus, g2.memory, g2.gpus) == ("g2", (2, 8, 9), 1_000_000, ())
    assert got.teams["research"].quota_memory == 1024**4 and got.teams["research"].priority == 10
    assert got.teams["batch"].quota_gpus is None and got.source == str(tmp_path / "pools.yaml")


def test_no_teams_means_one_default_team_without_quota(tmp_path: Path) -> None:
    got = load_inventory(write(tmp_path, "pools: {p: {nodes: [{name: n, cpus: 1, memory: 1GiB}]}}"))
    assert list(got.teams) == [DEFAULT_TEAM]
    assert got.teams[DEFAULT_TEAM].priority == 0 and got.teams[DEFAULT_TEAM].quota_gpus is None


def test_the_documented_example_is_valid(tmp_path: Path) -> None:
    doc = inv.__doc__ or ""
    block = doc.split("The format::", 1)[1].split("\n\n")[1]
    got = load_inventory(write(tmp_path, block))
    assert set(got.pools) == {"a100", "cpu"} and len(got.pools["a100"].node("gpu-1").cpus) == 64
    assert got.teams["research"].quota_gpus == 8


def test_auto_fields_are_discovered_on_the_loading_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inv, "discover_gpus", lambda: (inv.GpuDevice("GPU-x", 0, "GPU-x", 16 * GiB, "T4"),))
    got = load_inventory(write(tmp_path, "pools: {p: {nodes: [{name: n, cpus: auto, memory: auto, gpus: auto}]}}"))
    node = got.pools["p"].node("n")
    assert node.cpus == tuple(sorted(os.sched_getaffinity(0)))
    assert node.memory == discover_memory() and [g.id for g in node.gpus] == ["GPU-x"]


BAD = [
    ("unknown-field", "pools: {p: {placment: pack, nodes: [{name: n, cpus: 1, memory: 1GiB}]}}",
     ["pools.p.placment", "did you mean 'placement'?"]),
    ("gpu-typo", "pools: {p: {nodes: [{name: n, cpus: 1, memory: 1GiB, gpus: [{index: 0, memroy: 8GiB}]}]}}",
     ["pools.p.nodes[0].gpus[0].memroy", "did you mean 'memory'?", "pools.p.nodes[0].gpus[0].memory: required"]),
    ("missing-memory", "pools: {p: {nodes: [{name: n, cpus: 1}]}}",
     ["pools.p.nodes[0].memory: required but missing; add it"]),
    ("bad-size", "pools: {p: {nodes: [{name: n, cpus: 1, memory: 12 parsecs}]}}",
     ["pools.p.nodes[0].memory", "'12 parsecs'", "write e.g. 64GiB or auto"]),
    ("bad-cpus", "pools: {p: {nodes: [{name: n, cpus: -2, memory: 1GiB}]}}",
     ["pools.p.nodes[0].cpus", "a core count (16), a list of core ids"]),
    ("repeated-cores", "pools: {p: {nodes: [{name: n, cpus: [1, 1], memory: 1GiB}]}}",
     ["pools.p.nodes[0].cpus", "list each core once"]),
    ("bad-placement", "pools: {p: {placement: fast, nodes: [{name: n, cpus: 1, memory: 1GiB}]}}",
     ["pools.p.placement", "'pack' or 'spread'", "'fast'"]),
    ("no-nodes", "pools: {p: {nodes: []}}", ["pools.p.nodes", "list at least one"]),
    ("no-pools", "teams: {}", ["pools: required but missing"]),
    ("same-node-twice", "pools: {a: {nodes: [{name: n, cpus: 1, memory: 1}]}, b: {nodes: [{name: n, cpus: 1, "
                        "memory: 1}]}}", ["node 'n' is listed in pool 'a' and again in pool 'b'"]),
    ("same-gpu-index", "pools: {p: {nodes: [{name: n, cpus: 1, memory: 1, gpus: [{index: 0, memory: 1}, "
                       "{index: 0, memory: 1}]}]}}", ["pools.p.nodes[0]", "same index"]),
    ("bad-quota", "pools: {p: {nodes: [{name: n, cpus: 1, memory: 1}]}}\nteams: {t: {quota: {gpu: 1}}}",
     ["teams.t.quota.gpu", "did you mean 'gpus'?"]),
    ("bad-priority", "pools: {p: {nodes: [{name: n, cpus: 1, memory: 1}]}}\nteams: {t: {priority: high}}",
     ["teams.t.priority", "whole number"]),
    ("bad-name", "pools: {'p q': {nodes: [{name: n, cpus: 1, memory: 1}]}}", ["pool name 'p q'"]),
    ("not-a-mapping", "- a\n- b\n", ["expected a mapping with 'pools'"]),
    ("not-yaml", "pools: [unclosed", ["not valid YAML"]),
]


@pytest.mark.parametrize(("text", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_invalid_files_name_file_field_and_fix(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InventoryError) as err:
        load_inventory(path)
    message = str(err.value)
    assert str(path) in message
    for part in expected:
        assert part in message


def test_missing_file_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="cannot read the file.*KILN_POOLS_FILE"):
        load_inventory(tmp_path / "nope.yaml")


def test_parse_nvidia_smi_rows() -> None:
    out = "1, GPU-bbbb, 40960, NVIDIA A100-PCIE-40GB\n0, GPU-aaaa, 81920, NVIDIA H100 80GB HBM3\n\n"
    gpus = parse_nvidia_smi(out)
    assert [(g.index, g.id, g.memory, g.model) for g in gpus] == [(0, "GPU-aaaa", 80 * GiB, "NVIDIA H100 80GB HBM3"),
                                                                  (1, "GPU-bbbb", 40 * GiB, "NVIDIA A100-PCIE-40GB")]


def test_discover_local_runs_nvidia_smi_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '0, GPU-1234, 24576, NVIDIA L4'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    got = discover_local()
    node = got.pools["local"].node("localhost")
    assert [(g.id, g.memory, g.model) for g in node.gpus] == [("GPU-1234", 24 * GiB, "NVIDIA L4")]
    assert (node.address, node.docker_url) == ("127.0.0.1", None)
    assert node.cpus == tuple(sorted(os.sched_getaffinity(0))) and node.memory > 0


def test_discover_local_without_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery.shutil, "which", lambda name: None)
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)  # import fails: no NVML either
    got = discover_local()
    assert list(got.pools) == ["local"] and got.pools["local"].node("localhost").gpus == ()
    assert list(got.teams) == [DEFAULT_TEAM] and got.source == "discovered"


def test_discover_memory_reads_memtotal(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemFree:  10 kB\nMemTotal:       16384 kB\n")
    assert discover_memory(meminfo) == 16384 * 1024


def test_from_settings_reads_kiln_pools_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_POOLS_FILE", str(write(tmp_path, EXAMPLE)))
    assert set(Inventory.from_settings().pools) == {"gpu", "cpu"}
    monkeypatch.delenv("KILN_POOLS_FILE")
    assert list(inv.inventory_from_settings().pools) == ["local"]

