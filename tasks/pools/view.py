"""Text views of a lease-store snapshot (:meth:`LeaseStore.snapshot`): a status table and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from kiln.tasks.pools.allocation import format_size

_METRICS = (
    ("kiln_pool_gpus_total", "GPUs a node lends", lambda n: n["gpus"]["total"]),
    ("kiln_pool_gpus_used", "GPUs of a node held by granted leases", lambda n: n["gpus"]["used"]),
    ("kiln_pool_cpus_total", "CPU cores a node lends", lambda n: n["cpus"]["total"]),
    ("kiln_pool_cpus_used", "CPU cores of a node held by granted leases", lambda n: n["cpus"]["used"]),
    ("kiln_pool_memory_bytes_total", "Memory a node lends, in bytes", lambda n: n["memory"]["total"]),
    ("kiln_pool_memory_bytes_used", "Memory of a node held by granted leases, in bytes", lambda n: n["memory"]["used"]),
)


def _age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def render_status(snapshot: dict[str, Any]) -> str:
    """Pools with their nodes' capacity and usage, each pool's queue in grant order and its leases; then teams."""
    lines = [f"inventory: {snapshot['inventory']}"]
    for name, pool in snapshot["pools"].items():
        lines.append(f"\npool {name} (placement {pool['placement']})")
        rows = [["NODE", "ADDRESS", "GPUS", "CPUS", "MEMORY"]]
        for node_name, n in pool["nodes"].items():
            rows.append([node_name, n["address"], f"{n['gpus']['used']}/{n['gpus']['total']}",
                         f"{n['cpus']['used']}/{n['cpus']['total']}",
                         f"{format_size(n['memory']['used'])}/{format_size(n['memory']['total'])}"])
        lines += _table(rows)
        lines.append(f"  waiting: {len(pool['waiting'])}")
        if pool["waiting"]:
            lines += _table([["#", "LEASE", "TEAM", "PRIO", "OWNER", "WAITING", "REQUEST"]]
                            + [[str(i + 1), w["id"], w["team"], str(w["priority"]), w["owner"], _age(w["age_s"]),
                                w["request"]] for i, w in enumerate(pool["waiting"])], indent="    ")
        lines.append(f"  leases: {len(pool['leases'])}")
        if pool["leases"]:
            lines += _table([["LEASE", "TEAM", "OWNER", "AGE", "EXPIRES", "DEVICES"]]
                            + [[lease["id"], lease["team"], lease["owner"], _age(lease["age_s"]),
                                f"in {_age(lease['expires_in_s'])}" if lease["expires_in_s"] >= 0 else "overdue",
                                "; ".join(_devices(n) for n in lease.get("nodes", []))]
                               for lease in pool["leases"]], indent="    ")
    lines.append("\nteams:")
    rows = [["TEAM", "PRIO", "GPUS", "CPUS", "MEMORY"]]
    for name, team in snapshot["teams"].items():
        quota, used = team["quota"], team["used"]
        rows.append([name, str(team["priority"]), _of(used["gpus"], quota["gpus"], str),
                     _of(used["cpus"], quota["cpus"], str), _of(used["memory"], quota["memory"], format_size)])
    lines += _table(rows)
    return "\n".join(lines)


def _devices(node: dict[str, Any]) -> str:
    parts = [f"gpus {','.join(node['gpus'])}"] if node["gpus"] else []
    if node["cpus"]:
        parts.append(f"cpus {node['cpus']}")
    if node["memory"]:
        parts.append(format_size(node["memory"]))
    return f"{node['node']}: {' '.join(parts) or '-'}"


def _of(used: int, quota: int | None, fmt: Any) -> str:
    return f"{fmt(used)}/{fmt(quota) if quota is not None else '-'}"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(snapshot: dict[str, Any]) -> str:
    """Prometheus text exposition (version 0.0.4) of per-node capacity and usage and per-pool queue and leases."""
    lines: list[str] = []
    for metric, help_text, value in _METRICS:
        lines += [f"# HELP {metric} {help_text}.", f"# TYPE {metric} gauge"]
        for pool_name, pool in snapshot["pools"].items():
            for node_name, node in pool["nodes"].items():
                lines.append(f'{metric}{{pool="{_label(pool_name)}",node="{_label(node_name)}"}} {value(node)}')
    for metric, help_text, key in (("kiln_pool_waiting", "Requests waiting in the pool's queue", "waiting"),
                                   ("kiln_pool_leases", "Granted leases in the pool", "leases")):
        lines += [f"# HELP {metric} {help_text}.", f"# TYPE {metric} gauge"]
        lines += [f'{metric}{{pool="{_label(name)}"}} {len(pool[key])}' for name, pool in snapshot["pools"].items()]
    return "\n".join(lines) + "\n"
