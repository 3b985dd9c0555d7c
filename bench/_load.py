"""Load driving for ``bench/serving.py``: a server process under test (start pinned to a core, wait for its
health route, one request, stop) and ``wrk`` runs against it, cell by cell with the servers taking turns; what a
capturing server counted and stored."""

from __future__ import annotations

import argparse
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import REPO, cpu_seconds

from kiln.tasks.processes import ProcessGroup, start_process

BENCH = Path(__file__).resolve().parent
START_TIMEOUT_S = 120.0


@dataclass
class Server:
    """One server process under test and the requests it answers."""

    name: str
    cmd: list[str]
    url: str
    health_url: str
    bodies: dict[int, Path]
    labels: Callable[[Any], list[str]]
    """The predicted labels in a decoded answer, to check that the servers agree."""
    token: str = ""
    env: dict[str, str] = field(default_factory=dict)
    proc: ProcessGroup | None = None
    log: Path | None = None

    def start(self, cpu: str, logs: Path) -> None:
        """Start pinned to ``cpu`` in its own process group (``mlflow models serve`` forks uvicorn)."""
        self.log = logs / f"{self.name}.log"
        self.proc = start_process(["taskset", "-c", cpu, *self.cmd], output=self.log, cwd=REPO, env=self.env)

    def wait_ready(self) -> None:
        """Return once ``health_url`` answers 200; raise with the log tail if the process exits or never does."""
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if (code := self.proc.poll()) is not None:
                raise RuntimeError(f"{self.name} server exited with {code}:\n{self.log_tail()}")
            if get_ok(self.health_url):
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} server did not answer {self.health_url} in {START_TIMEOUT_S:g} s:\n"
                           f"{self.log_tail()}")

    def post(self, rows: int) -> Any:
        """One request with the ``rows``-record body; returns the decoded JSON answer (raises unless 200)."""
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url, data=self.bodies[rows].read_bytes(), headers=headers)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        """Terminate the process group (SIGKILL after 10 s)."""
        if self.proc is not None:
            self.proc.stop(grace_s=10, what=f"{self.name} server")

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log and self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def run_wrk(server: Server, clients: int, rows: int, duration_s: int, cpu: str) -> dict:
    """One wrk run against ``server``; returns the Lua script's JSON summary (raises on non-2xx answers) with
    ``cpu_us``: the server's CPU time per answered request, which other load on the machine changes far less than
    requests/s."""
    cmd = ["taskset", "-c", cpu, "wrk", "-t1", f"-c{clients}", f"-d{duration_s}s", "--timeout", "10s",
           "-s", str(BENCH / "wrk_post.lua"), server.url, "--", str(server.bodies[rows]), server.token]
    assert server.proc is not None
    cpu_before = cpu_seconds(server.proc.pid)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60)
    cpu_used = cpu_seconds(server.proc.pid) - cpu_before
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}) against {server.name}: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["cpu_us"] = 1e6 * cpu_used / max(result["requests"], 1)
    if result["errors"]["status"]:
        raise RuntimeError(f"{server.name} answered {result['errors']['status']} of {result['requests']} requests "
                           f"with a non-2xx status ({clients} clients, {rows} rows):\n{server.log_tail()}")
    # Requests still queued in the server when wrk stops must not run into the next server's turn.
    if not get_ok(server.health_url):
        raise RuntimeError(f"{server.name} stopped answering {server.health_url}:\n{server.log_tail()}")
    return result


def measure(servers: list[Server], args: argparse.Namespace) -> dict[tuple[str, int, int], dict]:
    """Warm every server, then run each (clients, rows) cell on every server in turn (rotating the order),
    ``args.repeat`` times; each cell's result is its run with the median requests/s, with ``rps_runs``: every
    run's requests/s in turn order (run i of two servers ran in the same round)."""
    for s in servers if args.warmup else ():
        for rows in args.rows:
            run_wrk(s, max(args.clients), rows, args.warmup, args.client_cpu)
    runs: dict[tuple[str, int, int], list[dict]] = {}
    cells = [(c, r) for r in args.rows for c in args.clients]
    for i, (clients, rows) in enumerate(cells * args.repeat):
        # Who goes first moves on from cell to cell and, for the same cell, from round to round (with as many
        # cells per round as servers, a shift by the cell's index alone would give a cell the same order each round).
        shift = (i % len(cells) + i // len(cells)) % len(servers)
        order = servers[shift:] + servers[:shift]
        for s in order:
            r = run_wrk(s, clients, rows, args.duration, args.client_cpu)
            runs.setdefault((s.name, clients, rows), []).append(r)
            print(json.dumps({"server": s.name, "clients": clients, "rows": rows, "rps": r["rps"],
                              "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "cpu_us": round(r["cpu_us"], 1),
                              "socket_errors": sum(r["errors"].values())}), flush=True)
    return {key: {**sorted(rs, key=lambda r: r["rps"])[len(rs) // 2], "rps_runs": [r["rps"] for r in rs]}
            for key, rs in runs.items()}


def scrape_capture_counters(server: Server) -> dict[str, int]:
    """The server's own count of records predicted, captured and dropped by the capture (``GET /metrics``)."""
    req = urllib.request.Request(server.url.rsplit("/", 1)[0] + "/metrics",
                                 headers={"Authorization": f"Bearer {server.token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        text = resp.read().decode()
    names = {"predicted": "kiln_serve_records_predicted_total", "captured": "kiln_capture_records_total",
             "dropped": "kiln_capture_dropped_total"}
    return {key: int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                         if line.startswith((name + "{", name + " ")))) for key, name in names.items()}


def stored_capture_rows(store: Path) -> dict[str, int]:
    """Captured batches and their rows in a server's artifact root (read after the server stopped and flushed)."""
    import pyarrow.parquet as pq

    files = sorted(store.rglob("capture.parquet"))
    return {"files": len(files), "stored_rows": sum(pq.ParquetFile(f).metadata.num_rows for f in files)}
