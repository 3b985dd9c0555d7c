"""The serving benchmark's comparisons (``bench/serving.py``): which servers each one sets against which, its
target, and the markdown table and JSON result lines that report it."""

from __future__ import annotations

import json
import statistics
from typing import Any

#: Our server with each model runtime (``--runtimes``); torchscript, the peer, serves a format 1 bundle.
RUNTIME_SERVERS = ("torchscript", "torch", "onnx")
#: Our server with capture at the default share and off (``--capture``): name -> the deployment's capture share.
CAPTURE_SERVERS = {"capture_on": 0.1, "capture_off": 0.0}
#: Records per request of each cell.
ROWS = (1, 32)
TARGET_VS_MLFLOW, TARGET_P99_MS, TARGET_VS_BARE = 6.0, 50.0, 0.7
TARGET_VS_TORCHSCRIPT = 1.0
TARGET_CAPTURE_VS_OFF = 0.95


def markdown_table(results: dict[tuple[str, int, int], dict], names: list[str]) -> str:
    """One row per (rows, clients) cell, req/s and p50/p99 per server."""
    head = "| records/request | clients | " + " | ".join(f"{n} req/s | {n} p50 / p99 ms | {n} CPU µs/req"
                                                        for n in names) + " |"
    lines = [head, "|" + "---|" * (2 + 3 * len(names))]
    for rows, clients in sorted({(r, c) for _, c, r in results}):
        cells = []
        for n in names:
            r = results[(n, clients, rows)]
            cells += [f"{r['rps']:,.0f}", f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}", f"{r['cpu_us']:.0f}"]
        lines.append(f"| {rows} | {clients} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(results: dict[tuple[str, int, int], dict], names: list[str], calls: dict[str, dict[int, float]],
           captured: dict[str, dict[str, int]]) -> None:
    """Print the table and, when ours, MLflow and bare were all measured, the JSON result line (last); when the
    three runtimes were, or capture on and off, their JSON line."""
    print(markdown_table(results, names), flush=True)
    if 1 not in {r for _, _, r in results}:
        return
    if set(CAPTURE_SERVERS) <= set(names):
        report_capture(results, names, captured)
    if set(RUNTIME_SERVERS) <= set(names):
        report_runtimes(results, names, calls)
    if {"ours", "mlflow", "bare"} <= set(names):
        report_vs_mlflow(results, names)


def report_vs_mlflow(results: dict[tuple[str, int, int], dict], names: list[str]) -> None:
    """The ``serving`` line: ours against ``mlflow models serve`` and the bare endpoint."""
    top = max(c for _, c, _ in results)
    ours, mlf, bare = (results[(n, top, 1)] for n in ("ours", "mlflow", "bare"))
    vs_bare = ours["rps"] / bare["rps"]
    met = {"p99": ours["p99_ms"] <= TARGET_P99_MS, "bare": vs_bare >= TARGET_VS_BARE}
    print(f"ours at {top} clients, 1 record: {ours['rps']:.0f} req/s, p99 {ours['p99_ms']:.1f} ms "
          f"(target <= {TARGET_P99_MS:g} ms: {'met' if met['p99'] else 'NOT met'}); ours / bare {vs_bare:.2f} "
          f"(target >= {TARGET_VS_BARE:g}: {'met' if met['bare'] else 'NOT met'})", flush=True)
    print_line("serving", ours["rps"], mlf["rps"], TARGET_VS_MLFLOW, results, names,
               peer=(f"`mlflow models serve`, {top} clients, 1 record/request, p99 {mlf['p99_ms']:.0f} ms (ours: p99 "
                     f"{ours['p99_ms']:.1f} ms, target <= {TARGET_P99_MS:g} ms; ours / bare FastAPI "
                     f"{vs_bare:.2f} at {bare['rps']:.0f} req/s, target >= {TARGET_VS_BARE:g})"),
               ours_vs_bare=round(vs_bare, 3))


def report_runtimes(results: dict[tuple[str, int, int], dict], names: list[str],
                    calls: dict[str, dict[int, float]]) -> None:
    """The ``serving_runtimes`` line: the runtime ``auto`` picks, and the other, against the TorchScript server."""
    from kiln.tasks.bundle.load import AUTO_WITH_ONNX

    top = max(c for _, c, _ in results)
    peer = results[("torchscript", top, 1)]
    runs = {n: results[(n, top, 1)] for n in ("onnx", "torch")}
    ratios = {n: r["rps"] / peer["rps"] for n, r in runs.items()}
    auto, other = ("onnx", "torch") if AUTO_WITH_ONNX == "onnx" else ("torch", "onnx")

    def says(n: str) -> str:
        return f"p99 {runs[n]['p99_ms']:.1f} ms, {runs[n]['cpu_us']:.0f} CPU µs/req"

    print(f"runtimes at {top} clients, 1 record: " + ", ".join(
        f"{n} {r['rps']:.0f} req/s ({says(n)}, {ratios[n]:.2f}x TorchScript)" for n, r in runs.items())
        + f"; TorchScript {peer['rps']:.0f} req/s (p99 {peer['p99_ms']:.1f} ms, {peer['cpu_us']:.0f} CPU µs/req)",
        flush=True)
    print_line("serving_runtimes", runs[auto]["rps"], peer["rps"], TARGET_VS_TORCHSCRIPT, results, names,
               peer=(f"TorchScript server (format 1 bundle), {top} clients, 1 record/request, p99 "
                     f"{peer['p99_ms']:.1f} ms, {peer['cpu_us']:.0f} CPU µs/req (value: the {auto} runtime, "
                     f"auto's choice, {says(auto)}; {other} runtime {runs[other]['rps']:.0f} req/s = "
                     f"{ratios[other]:.2f}x, {says(other)}; the model call alone at "
                     f"{'/'.join(map(str, ROWS))} rows: " + ", ".join(
                         f"{n} {'/'.join(f'{us:.0f}' for us in calls[n].values())} µs" for n in calls) + ")"),
               ratios={k: round(v, 3) for k, v in ratios.items()}, model_call_us=calls)


def report_capture(results: dict[tuple[str, int, int], dict], names: list[str],
                   captured: dict[str, dict[str, int]]) -> None:
    """The ``serving_capture`` line: our server capturing 10 % of its requests against the same server not
    capturing, with what each captured (Parquet rows in its store, and its own counters)."""
    top = max(c for _, c, _ in results)
    on, off = results[("capture_on", top, 1)], results[("capture_off", top, 1)]
    say = {n: f"{c['stored_rows']:,} rows in {c['files']} files captured of {c['predicted']:,} records predicted "
              f"(counter {c['captured']:,}, dropped {c['dropped']:,})" for n, c in captured.items()}
    rounds = [a / b for a, b in zip(on["rps_runs"], off["rps_runs"], strict=True)]
    more = "".join(
        f"; {rows} records/request: on {results[('capture_on', top, rows)]['rps']:.0f} req/s (p99 "
        f"{results[('capture_on', top, rows)]['p99_ms']:.1f} ms), off {results[('capture_off', top, rows)]['rps']:.0f}"
        f" (p99 {results[('capture_off', top, rows)]['p99_ms']:.1f} ms)"
        for rows in sorted({r for _, _, r in results} - {1}))
    # The ratio is the median of the rounds' ratios: on and off ran back to back in each round, so each ratio
    # compares them at one machine speed; the ratio of the two medians mixes rounds, and a shared machine's speed
    # moves by 10-20 % from round to round, more than capture costs.
    paired = statistics.median(rounds)
    print_line("serving_capture", on["rps"], off["rps"], TARGET_CAPTURE_VS_OFF, results, names, ratio=paired,
               peer=(f"the same server with capture off (share 0), same bundle, {top} clients, 1 record/request, p99 "
                     f"{off['p99_ms']:.1f} ms, {off['cpu_us']:.0f} CPU µs/req (ratio: the median of the paired "
                     f"rounds' ratios, {', '.join(f'{r:.3f}' for r in rounds)}; the ratio of the two medians "
                     f"{on['rps'] / off['rps']:.3f}; CPU µs/req off / on {off['cpu_us'] / on['cpu_us']:.3f}; "
                     f"capture at 0.1: p99 "
                     f"{on['p99_ms']:.1f} ms, {on['cpu_us']:.0f} CPU µs/req, {say['capture_on']}; off: "
                     f"{say['capture_off']}{more})"), captured=captured,
               round_ratios=[round(r, 3) for r in rounds])


def print_line(name: str, value: float, peer_value: float, target: float,
               results: dict[tuple[str, int, int], dict], names: list[str], peer: str, ratio: float | None = None,
               **extra: Any) -> None:
    """Print one JSON result line (req/s against a peer's, target ``>= target``) with every cell; ``ratio``
    defaults to ``value / peer_value``."""
    print(json.dumps({"name": name, "value": round(value, 3), "unit": "req/s", "peer": peer,
                      "peer_value": round(peer_value, 3),
                      "ratio": round(value / peer_value if ratio is None else ratio, 3),
                      "target": f">= {target:g}", **extra, "cells": cell_list(results),
                      "details": markdown_table(results, names)}), flush=True)


def cell_list(results: dict[tuple[str, int, int], dict]) -> list[dict]:
    """Every measured cell, for the JSON line."""
    return [{"server": n, "clients": c, "rows": r, **{k: round(v[k], 3) for k in ("rps", "p50_ms", "p99_ms", "cpu_us")}}
            for (n, c, r), v in sorted(results.items())]
