"""serving: requests/s and p50/p99 latency of our model server against ``mlflow models serve`` and a bare endpoint.

The model is the penguins example pipeline's MLP (``dags/pipelines/penguins_species.yaml``), trained by running
the pipeline in this process under a temporary ``KILN_HOME``. Three servers serve it, one process each, all
pinned to the same core (``taskset -c 1``) with one torch thread:

* ours: ``python -m kiln.tasks.serving`` over a deployment whose champion is the bundle exported from the run
  (``kiln.tasks.bundle.export.export_bundle``), default runtime (``auto``); ``POST /predict`` with
  ``{"records": [...]}`` and a bearer token.
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
rotating order) so that drift in the machine's speed falls on all three alike; ``--repeat N`` runs every cell N
times and keeps the run with the median requests/s. Each cell also records the server's CPU time per request
(``cpu_us``, its process tree's user + system time over the answered requests), which other load on a shared
machine moves far less than requests/s. Before the load, each server answers 32 records and all must predict the
same labels; a cell with a non-2xx response fails the benchmark.

Targets at 64 clients, 1 record per request: ours >= 6x MLflow's requests/s (the JSON line's ``ratio``) with p99
<= 50 ms, and ours >= 0.7x the bare endpoint (both in the ``peer`` text). The JSON line also carries
``ours_vs_bare`` and every cell (``cells``); the markdown table of all cells is printed above it. Needs ``wrk``
(``apt-get install wrk``) and two CPUs. ``--help`` lists the options (durations, cells, servers, cores).

``--runtimes`` compares our server's model runtimes instead, on the same bundle, 64 clients, 1 and 32 records:

* torchscript: today's TorchScript server, the peer: a format 1 bundle (``model.ts``, ``torch.jit.script`` of the
  network with its output head, as kiln exported before bundle format 2) written here from the run's ``model.pt``;
* torch: the bundle's exported program (``model.pt2``), ``--runtime torch``;
* onnx: ONNX Runtime on the bundle's ``model.onnx``, ``--runtime onnx``.

Before the servers start, each runtime's model call alone (``Bundle.predict_features`` of 1 and 32 rows, this
process pinned to the servers' core) is timed: for so small a network it is a few percent of a request, which
the HTTP figures hide. The JSON line (name ``serving_runtimes``) is the runtime that ``auto`` picks against
TorchScript at 64 clients, 1 record (target >= 1.0), with the other runtime's ratio, every p99, CPU time per request
and the model-call times in the ``peer`` text (``ratios``, ``model_call_us``, ``cells``: all of it).

``--capture`` measures what traffic capture costs (monitoring): our server twice on the same bundle and runtime,
its deployment file saying ``"capture": {"share": 0.1}`` (capture_on, the default share) or ``{"share": 0}``
(capture_off), 64 clients, 1 and 32 records, the two taking turns in each cell. Each server captures into its own
temporary artifact root (``KILN_ARTIFACT_ROOT``); after the servers stop (which flushes the buffers) the captured
Parquet rows are counted, with the server's own counters (records predicted, captured, dropped), to show that
capture was on, at the share asked, in one server only. The JSON line (name ``serving_capture``): capture_on's
requests/s against capture_off's at 64 clients, 1 record (target >= 0.95), both p99s and the counts in the
``peer`` text. Its ratio is the median of the rounds' ratios (``round_ratios``): the two servers run back to back
in each round, so each round compares them at one machine speed, while the speed of a shared machine moves by
10-20 % between rounds, more than capture costs; the ratio of the two medians and the CPU time per request of
each are in the ``peer`` text too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from _common import REPO, time_model_calls, write_torchscript_bundle
from _load import Server, measure, scrape_capture_counters, stored_capture_rows
from _serving_report import CAPTURE_SERVERS, ROWS, RUNTIME_SERVERS, report

from kiln.tasks.processes import free_port

BENCH = Path(__file__).resolve().parent
SPEC = REPO / "dags" / "pipelines" / "penguins_species.yaml"
SERVERS = ("ours", "mlflow", "bare")
CLIENTS = (1, 16, 64)
DURATION_S, WARMUP_S = 8, 3  # whole seconds: wrk takes no fractions
TOKEN = "bench-serving-token"


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


def export_bundle_of_run(tmp: Path, features_dir: Path, model_dir: Path) -> Path:
    """The run's bundle (format 2: ``model.pt2`` and ``model.onnx``), exported once for every kiln server."""
    from kiln.tasks.bundle.export import ExportConfig, export_bundle

    bundle = tmp / "bundle"
    if not bundle.is_dir():
        export_bundle(ExportConfig(features_dir, model_dir), bundle)
    return bundle


def make_ours(tmp: Path, bundle: Path, rows: pd.DataFrame, model_name: str, name: str = "ours",
              runtime: str = "auto", capture_share: float | None = None) -> Server:
    """Write a deployment with ``bundle`` as champion and describe ``python -m kiln.tasks.serving --runtime``;
    ``capture_share`` is the deployment's ``capture.share`` (``None``: the default), captured into
    ``tmp/store_<name>``."""
    from kiln.tasks.serving.deployment import CaptureSettings, Deployment, ModelRef, utc_now, write_deployment

    deployment = tmp / f"deployment_{name}.json"
    capture = CaptureSettings() if capture_share is None else CaptureSettings(share=capture_share)
    write_deployment(deployment, Deployment(model=model_name, champion=ModelRef(version="1", bundle=str(bundle)),
                                            canary=None, updated_at=utc_now(), capture=capture))
    port = free_port()
    bodies = write_bodies(tmp, "ours", lambda n: '{"records": ' + rows.head(n).to_json(orient="records") + "}")
    return Server(name, [sys.executable, "-m", "kiln.tasks.serving", "--deployment", str(deployment),
                         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--runtime", runtime],
                  f"http://127.0.0.1:{port}/predict", f"http://127.0.0.1:{port}/health", bodies,
                  lambda body: [p["label"] for p in body["predictions"]], token=TOKEN,
                  env={**server_env(tmp / "home"), "KILN_SERVE_TOKEN": TOKEN,
                       "KILN_SERVING_DIR": str(tmp / "serving"), "KILN_ARTIFACT_ROOT": str(tmp / f"store_{name}")})


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
    port = free_port()
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
    port = free_port()
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=DURATION_S, help="seconds per cell (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=WARMUP_S,
                        help="seconds of warm-up per server and request size (default %(default)s; 0: none)")
    parser.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS), help="wrk connections per cell")
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS), choices=ROWS, help="records per request")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each cell per server; the median counts "
                        "(default %(default)s)")
    parser.add_argument("--servers", nargs="+", default=None, choices=SERVERS + RUNTIME_SERVERS
                        + tuple(CAPTURE_SERVERS),
                        help=f"servers to measure (default {' '.join(SERVERS)}; with --runtimes "
                        f"{' '.join(RUNTIME_SERVERS)})")
    parser.add_argument("--runtimes", action="store_true", help="compare our server's runtimes (TorchScript, torch, "
                        "onnx) at 64 clients (unless --clients says otherwise), instead of ours, MLflow and bare")
    parser.add_argument("--capture", action="store_true", help="our server with capture at 10 %% against capture "
                        "off, at 64 clients (unless --clients says otherwise)")
    parser.add_argument("--server-cpu", default="1", help="taskset CPU list of the servers (default %(default)s)")
    parser.add_argument("--client-cpu", default="0", help="taskset CPU list of wrk (default %(default)s)")
    args = parser.parse_args(argv)
    if args.runtimes and args.capture:
        parser.error("--runtimes and --capture are two separate comparisons: give one")
    if args.servers is None:
        args.servers = list(RUNTIME_SERVERS if args.runtimes else CAPTURE_SERVERS if args.capture else SERVERS)
    if (args.runtimes or args.capture) and args.clients == list(CLIENTS):
        args.clients = [max(CLIENTS)]
    if args.duration < 1 or args.warmup < 0 or min(args.clients) < 1 or args.repeat < 1:
        parser.error("--duration, --clients and --repeat must be >= 1 and --warmup >= 0 (0: no warm-up)")
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
        bundle = export_bundle_of_run(tmp, features_dir, model_dir)
        format1 = write_torchscript_bundle(bundle, model_dir, tmp / "bundle_format1")
        runtimes = {"torchscript": (format1, "auto"), "torch": (bundle, "torch"), "onnx": (bundle, "onnx")}
        def kiln_server(name: str) -> Server:
            folder, runtime = runtimes.get(name, (bundle, "auto"))
            return make_ours(tmp, folder, rows, spec.name, name, runtime=runtime,
                             capture_share=CAPTURE_SERVERS.get(name))

        makers: dict[str, Callable[[], Server]] = {
            "mlflow": lambda: make_mlflow(tmp, features_dir, model_dir, rows),
            "bare": lambda: make_bare(tmp, features_dir, model_dir, rows)}
        servers = [makers[n]() if n in makers else kiln_server(n) for n in args.servers]
        # The model alone, before any server runs: what the HTTP figures hide for so small a network.
        calls = time_model_calls({n: runtimes[n] for n in args.servers if n in runtimes}, ROWS,
                                 cpu=int(re.split(r"[,-]", args.server_cpu)[0]))
        for n, by_rows in calls.items():
            print(json.dumps({"model_call_us": n, **{str(r): round(us, 1) for r, us in by_rows.items()}}), flush=True)
        try:
            for s in servers:
                s.start(args.server_cpu, tmp)
            for s in servers:
                s.wait_ready()
            check_answers(servers)
            results = measure(servers, args)
            captured = {s.name: scrape_capture_counters(s) for s in servers if s.name in CAPTURE_SERVERS}
        finally:
            for s in servers:
                s.stop()
        # Stopping flushed the capture buffers: count what reached each server's store.
        for name, counters in captured.items():
            counters.update(stored_capture_rows(tmp / f"store_{name}"))
    report(results, [s.name for s in servers], calls, captured)


if __name__ == "__main__":
    main()
