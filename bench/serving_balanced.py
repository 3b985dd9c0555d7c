"""serving_balanced: requests/s and p99 through kiln's balancer with 2 replicas, against one kiln server directly and
against Ray Serve with 2 replicas and its own request batching, on the same model and records.

The model is the penguins example pipeline's MLP, trained and exported as ``bench/serving.py`` does. Three servers:

* balanced: ``python -m kiln.tasks.fleet`` (HAProxy on the endpoint's port in front of 2 kiln model servers, each
  pinned to the core it leased from the ``local`` pool; ``replicas: {min: 2, max: 2}``, so no autoscaling moves
  the figures);
* direct: one kiln model server (``python -m kiln.tasks.serving``), no balancer, free to run on both cores;
* ray: ``bench/_ray_serve_peer.py``, Ray Serve 2 replicas (1 CPU each), ``@serve.batch`` (32 requests, 2 ms),
  the same bundle loaded with kiln's loader, the same request body; Ray in its own venv (``var/bench/ray-venv``,
  made on first use) so that it never enters kiln's dependencies.

wrk (``bench/wrk_post.lua``, one record per request, 16 and 64 clients) is not pinned: on 2 cores every server
shares them with the load generator, which is the honest setting for "what does a second replica buy here"
(a replica per core leaves none for the client or the balancer). The servers take turns in each cell, rotating
who goes first, ``--repeat`` rounds; a cell keeps its median run. Target: balanced >= 3x Ray Serve's requests/s
at 64 clients, p99 reported for all three; the balancer's cost and the second replica's gain are balanced /
direct, in the ``peer`` text.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from _load import Server, measure
from _ray_serve_peer import ensure_ray_venv, ray_serve_argv
from _serving_report import print_line
from serving import (
    SPEC,
    TOKEN,
    check_answers,
    export_bundle_of_run,
    make_ours,
    raw_rows,
    server_env,
    train_penguins,
    write_bodies,
)

from kiln.tasks.processes import free_port

CLIENTS = (16, 64)
TARGET_VS_RAY = 3.0


def make_balanced(tmp: Path, bundle: Path, rows, model_name: str) -> Server:
    """The fleet of 2 replicas behind HAProxy over a deployment with ``bundle`` as champion."""
    from kiln.tasks.serving.deployment import Deployment, ModelRef, write_deployment
    from kiln.tasks.serving.scaling import ReplicaSettings

    run_dir = tmp / "fleet"
    run_dir.mkdir(exist_ok=True)
    deployment = run_dir / "deployment.json"
    write_deployment(deployment, Deployment(model=model_name, champion=ModelRef("1", str(bundle)),
                                            replicas=ReplicaSettings(min=2, max=2)))
    port = free_port()
    bodies = write_bodies(tmp, "balanced", lambda n: '{"records": ' + rows.head(n).to_json(orient="records") + "}")
    return Server("balanced", [sys.executable, "-m", "kiln.tasks.fleet", "--deployment", str(deployment),
                               "--host", "127.0.0.1", "--port", str(port), "--run-dir", str(run_dir),
                               "--log-level", "warning"],
                  f"http://127.0.0.1:{port}/predict", f"http://127.0.0.1:{port}/health", bodies,
                  lambda body: [p["label"] for p in body["predictions"]], token=TOKEN,
                  env={**server_env(tmp / "home"), "KILN_SERVE_TOKEN": TOKEN,
                       "KILN_SERVING_DIR": str(tmp / "serving"), "KILN_ARTIFACT_ROOT": str(tmp / "store_balanced")})


def make_ray(tmp: Path, bundle: Path, rows) -> Server:
    """Ray Serve, 2 replicas with request batching, over the same bundle and body."""
    port = free_port()
    bodies = write_bodies(tmp, "ray", lambda n: '{"records": ' + rows.head(n).to_json(orient="records") + "}")
    return Server("ray", ray_serve_argv(bundle, port, python=ensure_ray_venv(), replicas=2, token=TOKEN),
                  f"http://127.0.0.1:{port}/predict", f"http://127.0.0.1:{port}/health", bodies,
                  lambda body: [p["label"] for p in body["predictions"]], token=TOKEN,
                  env={**server_env(tmp / "home")})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=8, help="seconds per cell (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of warm-up per server (default %(default)s)")
    parser.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS))
    parser.add_argument("--repeat", type=int, default=3, help="rounds; a cell keeps its median (default %(default)s)")
    parser.add_argument("--servers", nargs="+", default=["balanced", "direct", "ray"],
                        choices=["balanced", "direct", "ray"])
    args = parser.parse_args(argv)
    args.rows, args.client_cpu = [1], "0-1"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if shutil.which("wrk") is None or shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists():
        sys.exit("serving_balanced needs wrk and haproxy: make wrk haproxy")
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as name:
        tmp = Path(name)
        os.environ.update(KILN_HOME=str(tmp / "home"), GX_ANALYTICS_ENABLED="false", MPLBACKEND="Agg")
        for var in ("KILN_ARTIFACT_ROOT", "KILN_MLFLOW_TRACKING_URI", "KILN_MLFLOW_ARTIFACT_ROOT", "KILN_SERVING_DIR",
                    "KILN_POOLS_FILE", "KILN_POOLS_DB_URL"):
            os.environ.pop(var, None)
        features_dir, model_dir = train_penguins(tmp / "home")
        from kiln.tasks.spec import load_spec

        spec = load_spec(SPEC)
        rows = raw_rows(features_dir, spec.target)
        bundle = export_bundle_of_run(tmp, features_dir, model_dir)
        makers = {"balanced": lambda: make_balanced(tmp, bundle, rows, spec.name),
                  "direct": lambda: make_ours(tmp, bundle, rows, spec.name, "direct"),
                  "ray": lambda: make_ray(tmp, bundle, rows)}
        servers = [makers[n]() for n in args.servers]
        try:
            for s in servers:
                s.start("0-1", tmp)
            for s in servers:
                s.wait_ready()
            check_answers(servers)
            results = measure(servers, args)
        finally:
            for s in servers:
                s.stop()
    report(results, [s.name for s in servers], max(args.clients))


def report(results: dict, names: list[str], clients: int) -> None:
    cell = {n: results[(n, clients, 1)] for n in names}
    say = {n: f"{c['rps']:.0f} req/s, p99 {c['p99_ms']:.1f} ms" for n, c in cell.items()}
    if "ray" not in cell or "balanced" not in cell:
        print(json.dumps({"cells": {n: say[n] for n in names}}))
        return
    direct = f"; one kiln server directly: {say['direct']} (balanced / direct " \
             f"{cell['balanced']['rps'] / cell['direct']['rps']:.2f})" if "direct" in cell else ""
    print_line("serving_balanced", cell["balanced"]["rps"], cell["ray"]["rps"], TARGET_VS_RAY, results, names,
               f"Ray Serve, 2 replicas, @serve.batch (32, 2 ms), {clients} clients, 1 record/request: {say['ray']} "
               f"(kiln balanced: {say['balanced']}{direct}; wrk unpinned on the same 2 cores)")


if __name__ == "__main__":
    main()
