"""serving: requests/s and p50/p99 latency of our model server against ``mlflow models serve`` and a bare endpoint.

The model is the penguins example pipeline's MLP (``dags/pipelines/penguins_species.yaml``), trained by running
the pipeline in this process under a temporary ``KILN_HOME``. Three servers serve it, one process each, all
pinned to the same core (``taskset -c 1``) with one torch thread:

* ours: ``python -m kiln.tasks.serving`` over a deployment whose champion is the bundle exported from the run
  (``kiln.tasks.bundle.load.export_bundle``); ``POST /predict`` with ``{"records": [...]}`` and a bearer token.
* mlflow: ``mlflow models serve --env-manager local --workers 1`` of a pyfunc logged into the run's temporary
  MLflow store; ``POST /invocations`` with ``{"dataframe_records": [...]}``. The pyfunc (``bench/_mlflow_model.py``)
  takes the same raw columns and applies the same fitted ``FeatureTransform`` before the network, rather than
  ``mlflow.pytorch.log_model`` of the bare module: a pytorch-flavour server would take feature matrices and skip
  the transform, so it would not do the work our server does and the ratio would compare different jobs. It is
  logged without a signature, so MLflow spends nothing on schema enforcement.
* bare: ``bench/_bare_server.py``, one FastAPI route under uvicorn (uvloop, httptools, one worker) that takes
  already-transformed float rows and returns the network's probabilities: the floor of Python HTTP serving here.

Every server answers the same raw rows (the run's ``test_raw.parquet``; bare gets their transformed features),
1 or 32 records per request. The load generator is ``wrk`` (one thread, pinned to the other core:
``taskset -c 0``) with ``bench/wrk_post.lua``, which prints latency percentiles as JSON; each cell (server,
clients in 1/16/64, rows) runs for DURATION_S after a warm-up, and the servers take turns within each cell (in
rotating order) so that drift in the machine's speed falls on all three alike. Before the load, each server
answers 32 records and all must predict the same labels; a cell with a non-2xx response fails the benchmark.

Targets at 64 clients, 1 record per request: ours >= 6x MLflow's requests/s (the JSON line's ``ratio``) with p99
<= 50 ms, and ours >= 0.7x the bare endpoint (both in the ``peer`` text). The JSON line also carries
``ours_vs_bare`` and every cell (``cells``); the markdown table of all cells is printed above it. Needs ``wrk``
(``apt-get install wrk``) and two CPUs. ``--help`` lists the options (durations, cells, servers, cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kiln.tasks.processes import ProcessGroup, start_process

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SPEC = REPO / "dags" / "pipelines" / "penguins_species.yaml"
SERVERS = ("ours", "mlflow", "bare")
CLIENTS, ROWS = (1, 16, 64), (1, 32)
DURATION_S, WARMUP_S = 8, 3  # whole seconds: wrk takes no fractions
TARGET_VS_MLFLOW, TARGET_P99_MS, TARGET_VS_BARE = 6.0, 50.0, 0.7
TOKEN = "bench-serving-token"
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
            if _get_ok(self.health_url):
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


def _get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_penguins(home: Path) -> tuple[Path, Path]:
    """Run the example pipeline in this process under ``home``; returns (features folder, model folder)."""
    from kiln.tasks.pipeline import keys
    from kiln.tasks.pipeline.context import make_context
    from kiln.tasks.pipeline.runner import run_all

    t0 = time.perf_counter()
    ctx = make_context(SPEC, "bench_serving")
    # ingest .. evaluate: the release steps would register and deploy the model
    steps = run_all(ctx, until=keys.EVALUATE).results
    print(f"trained the penguins MLP in {time.perf_counter() - t0:.1f} s (pipeline steps {', '.join(steps)}"
          f"; KILN_HOME={home})", flush=True)
    return ctx.input_dir("build_features"), ctx.input_dir("train")


def raw_rows(features_dir: Path, target: str) -> pd.DataFrame:
    """The run's raw test rows without the label, repeated to at least max(ROWS) rows."""
    from kiln.tasks.features.splits import TEST_RAW_FILE

    df = pd.read_parquet(features_dir / TEST_RAW_FILE).drop(columns=[target])
    while len(df) < max(ROWS):
        df = pd.concat([df, df], ignore_index=True)
    return df


def write_bodies(folder: Path, name: str, make: Callable[[int], str]) -> dict[int, Path]:
    """One body file per request size: ``make(n)`` returns the JSON text for ``n`` rows."""
    bodies = {}
    for n in ROWS:
        bodies[n] = folder / f"{name}_{n}.json"
        bodies[n].write_text(make(n))
    return bodies


def server_env(home: Path) -> dict[str, str]:
    """The environment of every server: one torch/BLAS thread, the venv first on PATH, this run's state."""
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "KILN_HOME": str(home),
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}


def make_ours(tmp: Path, features_dir: Path, model_dir: Path, rows: pd.DataFrame, model_name: str) -> Server:
    """Export the bundle, write a deployment with it as champion, and describe ``python -m kiln.tasks.serving``."""
    from kiln.tasks.bundle.export import ExportConfig, export_bundle
    from kiln.tasks.serving.deployment import Deployment, ModelRef, utc_now, write_deployment

    bundle = tmp / "bundle"
    export_bundle(ExportConfig(features_dir, model_dir), bundle)
    deployment = tmp / "deployment.json"
    write_deployment(deployment, Deployment(model=model_name, champion=ModelRef(version="1", bundle=str(bundle)),
                                            canary=None, updated_at=utc_now()))
    port = _free_port()
    bodies = write_bodies(tmp, "ours", lambda n: '{"records": ' + rows.head(n).to_json(orient="records") + "}")
    return Server("ours", [sys.executable, "-m", "kiln.tasks.serving", "--deployment", str(deployment),
                           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                  f"http://127.0.0.1:{port}/predict", f"http://127.0.0.1:{port}/health", bodies,
                  lambda body: [p["label"] for p in body["predictions"]], token=TOKEN,
                  env={**server_env(tmp / "home"), "KILN_SERVE_TOKEN": TOKEN,
                       "KILN_SERVING_DIR": str(tmp / "serving")})


def make_mlflow(tmp: Path, features_dir: Path, model_dir: Path, rows: pd.DataFrame) -> Server:
    """Log the raw-records pyfunc into this run's MLflow store and describe ``mlflow models serve`` of it."""
    import mlflow

    from kiln.tasks.features.transform import FEATURE_SPEC_FILE
    from kiln.tasks.settings import get_settings
    from kiln.tasks.tracking.runs import ensure_experiment

    s = get_settings()
    uri = s.mlflow_tracking_uri
    mlflow.set_tracking_uri(uri)
    # Artifacts under this run's KILN_HOME (mlflow.set_experiment would put them in ./mlruns).
    experiment = ensure_experiment(mlflow.MlflowClient(uri), "bench_serving", s.mlflow_artifact_root)
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pyfunc.log_model(
            name="penguins", python_model=str(BENCH / "_mlflow_model.py"),
            artifacts={"feature_spec": str(features_dir / FEATURE_SPEC_FILE), "model_dir": str(model_dir)},
            pip_requirements=["mlflow", "torch", "pandas"])  # given, so MLflow does not load the model to infer them
    port = _free_port()
    bodies = write_bodies(tmp, "mlflow",
                          lambda n: '{"dataframe_records": ' + rows.head(n).to_json(orient="records") + "}")
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    return Server("mlflow", [mlflow_cli, "models", "serve", "-m", info.model_uri, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
                  f"http://127.0.0.1:{port}/invocations", f"http://127.0.0.1:{port}/ping", bodies,
                  lambda body: [p["label"] for p in body["predictions"]],
                  env={**server_env(tmp / "home"), "MLFLOW_TRACKING_URI": uri})


def make_bare(tmp: Path, features_dir: Path, model_dir: Path, rows: pd.DataFrame) -> Server:
    """Describe ``bench/_bare_server.py``; its bodies are the same rows, transformed as the pipeline does."""
    from kiln.tasks.features.transform import FEATURE_SPEC_FILE, FeatureTransform

    transform = FeatureTransform.load(features_dir / FEATURE_SPEC_FILE)
    x = transform.transform(rows)
    port = _free_port()
    bodies = write_bodies(tmp, "bare", lambda n: json.dumps(x[:n].tolist()))
    return Server("bare", [sys.executable, str(BENCH / "_bare_server.py"), "--model-dir", str(model_dir),
                           "--host", "127.0.0.1", "--port", str(port)],
                  f"http://127.0.0.1:{port}/predict", f"http://127.0.0.1:{port}/health", bodies,
                  lambda body: list(transform.decode_target(np.asarray(body).argmax(1))),
                  env=server_env(tmp / "home"))


def check_answers(servers: list[Server]) -> None:
    """Before any load, every server answers the largest request with the same label for each record."""
    n = max(ROWS)
    answers = {}
    for s in servers:
        body = s.post(n)
        try:
            answers[s.name] = s.labels(body)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise RuntimeError(f"{s.name} answered {n} records with {str(body)[:300]} ({exc!r})") from None
    first = servers[0].name
    for name, labels in answers.items():
        if len(labels) != n or labels != answers[first]:
            raise RuntimeError(f"{name} predicts {labels} for the {n} records, {first} {answers[first]}")


def run_wrk(server: Server, clients: int, rows: int, duration_s: int, cpu: str) -> dict:
    """One wrk run against ``server``; returns the Lua script's JSON summary (raises on non-2xx answers)."""
    cmd = ["taskset", "-c", cpu, "wrk", "-t1", f"-c{clients}", f"-d{duration_s}s", "--timeout", "10s",
           "-s", str(BENCH / "wrk_post.lua"), server.url, "--", str(server.bodies[rows]), server.token]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}) against {server.name}: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["errors"]["status"]:
        raise RuntimeError(f"{server.name} answered {result['errors']['status']} of {result['requests']} requests "
                           f"with a non-2xx status ({clients} clients, {rows} rows):\n{server.log_tail()}")
    # Requests still queued in the server when wrk stops must not run into the next server's turn.
    if not _get_ok(server.health_url):
        raise RuntimeError(f"{server.name} stopped answering {server.health_url}:\n{server.log_tail()}")
    return result


def measure(servers: list[Server], args: argparse.Namespace) -> dict[tuple[str, int, int], dict]:
    """Warm every server, then run each (clients, rows) cell on every server in turn (rotating the order)."""
    for s in servers if args.warmup else ():
        for rows in args.rows:
            run_wrk(s, max(args.clients), rows, args.warmup, args.client_cpu)
    results = {}
    cells = [(c, r) for r in args.rows for c in args.clients]
    for i, (clients, rows) in enumerate(cells):
        order = servers[i % len(servers):] + servers[:i % len(servers)]
        for s in order:
            r = run_wrk(s, clients, rows, args.duration, args.client_cpu)
            results[(s.name, clients, rows)] = r
            print(json.dumps({"server": s.name, "clients": clients, "rows": rows, "rps": r["rps"],
                              "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
                              "socket_errors": sum(r["errors"].values())}), flush=True)
    return results


def markdown_table(results: dict[tuple[str, int, int], dict], names: list[str]) -> str:
    """One row per (rows, clients) cell, req/s and p50/p99 per server."""
    head = "| records/request | clients | " + " | ".join(f"{n} req/s | {n} p50 / p99 ms" for n in names) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(names))]
    for rows, clients in sorted({(r, c) for _, c, r in results}):
        cells = []
        for n in names:
            r = results[(n, clients, rows)]
            cells += [f"{r['rps']:,.0f}", f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}"]
        lines.append(f"| {rows} | {clients} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(results: dict[tuple[str, int, int], dict], names: list[str]) -> None:
    """Print the table and, when ours, MLflow and bare were all measured, the JSON result line (last)."""
    print(markdown_table(results, names), flush=True)
    top = max(c for _, c, _ in results)
    if not {"ours", "mlflow", "bare"} <= set(names) or 1 not in {r for _, _, r in results}:
        return
    ours, mlf, bare = (results[(n, top, 1)] for n in ("ours", "mlflow", "bare"))
    vs_bare = ours["rps"] / bare["rps"]
    met = {"p99": ours["p99_ms"] <= TARGET_P99_MS, "bare": vs_bare >= TARGET_VS_BARE}
    print(f"ours at {top} clients, 1 record: {ours['rps']:.0f} req/s, p99 {ours['p99_ms']:.1f} ms "
          f"(target <= {TARGET_P99_MS:g} ms: {'met' if met['p99'] else 'NOT met'}); ours / bare {vs_bare:.2f} "
          f"(target >= {TARGET_VS_BARE:g}: {'met' if met['bare'] else 'NOT met'})", flush=True)
    cells = [{"server": n, "clients": c, "rows": r, **{k: v[k] for k in ("rps", "p50_ms", "p99_ms")}}
             for (n, c, r), v in sorted(results.items())]
    line = {"name": "serving", "value": round(ours["rps"], 3), "unit": "req/s",
            "peer": (f"`mlflow models serve`, {top} clients, 1 record/request, p99 {mlf['p99_ms']:.0f} ms (ours: p99 "
                     f"{ours['p99_ms']:.1f} ms, target <= {TARGET_P99_MS:g} ms; ours / bare FastAPI "
                     f"{vs_bare:.2f} at {bare['rps']:.0f} req/s, target >= {TARGET_VS_BARE:g})"),
            "peer_value": round(mlf["rps"], 3), "ratio": round(ours["rps"] / mlf["rps"], 3),
            "target": f">= {TARGET_VS_MLFLOW:g}", "ours_vs_bare": round(vs_bare, 3), "cells": cells,
            "details": markdown_table(results, names)}
    print(json.dumps(line), flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=DURATION_S, help="seconds per cell (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=WARMUP_S,
                        help="seconds of warm-up per server and request size (default %(default)s; 0: none)")
    parser.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS), help="wrk connections per cell")
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS), choices=ROWS, help="records per request")
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    parser.add_argument("--server-cpu", default="1", help="taskset CPU list of the servers (default %(default)s)")
    parser.add_argument("--client-cpu", default="0", help="taskset CPU list of wrk (default %(default)s)")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.warmup < 0 or min(args.clients) < 1:
        parser.error("--duration and --clients must be >= 1 and --warmup >= 0 (0: no warm-up)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        sys.exit("serving benchmark needs wrk and taskset: apt-get install -y wrk util-linux")
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as name:
        tmp = Path(name)
        # The pipeline and the MLflow store of this run live in the temporary folder, never in the user's var/.
        os.environ.update(KILN_HOME=str(tmp / "home"), GX_ANALYTICS_ENABLED="false", MPLBACKEND="Agg")
        for var in ("KILN_ARTIFACT_ROOT", "KILN_MLFLOW_TRACKING_URI", "KILN_MLFLOW_ARTIFACT_ROOT", "KILN_SERVING_DIR"):
            os.environ.pop(var, None)
        features_dir, model_dir = train_penguins(tmp / "home")
        from kiln.tasks.spec import load_spec

        spec = load_spec(SPEC)
        rows = raw_rows(features_dir, spec.target)
        makers = {"ours": lambda: make_ours(tmp, features_dir, model_dir, rows, spec.name),
                  "mlflow": lambda: make_mlflow(tmp, features_dir, model_dir, rows),
                  "bare": lambda: make_bare(tmp, features_dir, model_dir, rows)}
        servers = [makers[n]() for n in args.servers]
        try:
            for s in servers:
                s.start(args.server_cpu, tmp)
            for s in servers:
                s.wait_ready()
            check_answers(servers)
            results = measure(servers, args)
        finally:
            for s in servers:
                s.stop()
    report(results, [s.name for s in servers])


if __name__ == "__main__":
    main()
