"""The Ray Serve peer of ``serving_balanced``: the same bundle behind Ray Serve, ``num_replicas`` replicas with Ray's
own request batching (``@serve.batch``) and Ray's HTTP proxy as the balancer.

``POST /predict`` takes exactly the model server's body (``{"records": [{...}, ...]}``), refuses a bad one as the
model server does (kiln's own ``parse_records`` and ``transform``: 413/422 naming the field) and answers 200 with
``{"model", "version", "variant", "predictions"}``, the predictions formatted by the bundle
(``Bundle.format_predictions``). With ``--token`` it wants ``Authorization: Bearer <token>`` (401 without), as the
model server does, so that both do the same work per request. ``GET /health`` answers 200 once the replicas run.
Each replica loads the bundle with kiln's loader (``kiln.tasks.bundle.load.load_bundle``, one intra-op thread) and
predicts each batch of requests in one forward pass::

    var/bench/ray-venv/bin/python bench/_ray_serve_peer.py --bundle DIR --port 8790 --replicas 2 \\
        --max-batch-size 32 --batch-wait-s 0.002

From another bench script (in the project's venv, which has no Ray): ``handle = start_ray_serve(bundle, port,
log_file=...)`` creates the Ray venv when missing, starts this script there and returns once ``/health`` answers;
``stop(handle)`` stops it (or build the command with :func:`ray_serve_argv` for a ``Server`` of ``bench/_load.py``).
Ray runs with ``num_cpus=2``, no dashboard, no metrics collection, no usage stats, no access log, its workers at
the default priority. The script is a supervisor: it runs the Ray driver as a child in a process group of its own
and, when the driver exits however it exits, stops what is left of that group (Ray's dashboard and runtime-env
agents outlive a killed driver); SIGTERM or SIGINT reach the driver first, which runs ``serve.shutdown()`` and
``ray.shutdown()`` in ``finally``. The supervisor dies with its owner and the driver with the supervisor
(parent-death signals); Ray's GCS, raylet and workers die with the driver.

Why a venv of its own: Ray is a benchmark peer, not a dependency of kiln, so it stays out of ``pyproject.toml``
and ``requirements.lock``. :func:`ensure_ray_venv` creates ``var/bench/ray-venv`` from the project's Python, makes
the project's site-packages (torch, numpy, pydantic, starlette, the editable kiln...) visible in it through a
``.pth`` file, and installs ``ray[serve]==2.60.0`` there with ``requirements.lock`` as pip constraints: every
package kiln pins keeps its exact version (pip refuses to resolve rather than shadow one), and only what Ray adds
and kiln lacks (ray, opencensus, py-spy, smart_open, virtualenv, aiohttp-cors, colorful...) lands in the Ray venv.
Ray 2.60.0 (the newest release; wheels for CPython 3.11) resolves against the lock as it is (pydantic 2.14,
fastapi 0.136, starlette 1.10, uvicorn 0.54, protobuf 7.36, grpcio 1.85, numpy 2.4), so both servers run the same
torch, ONNX Runtime and numpy builds on the same bundle.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RAY_VERSION = "2.60.0"
RAY_VENV = REPO / "var" / "bench" / "ray-venv"
START_TIMEOUT_S = 180.0
STOP_GRACE_S = 20.0
#: What Ray is told before it starts: no usage report, no metrics collection, quiet logs, one BLAS thread per
#: process, and workers (the proxy and replicas) at the default priority, as the model server runs (Ray's default
#: niceness 15 would hand the CPU to anything else on the machine, wrk included).
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_enable_metrics_collection": "0", "RAY_SERVE_LOG_TO_STDERR": "1",
           "RAY_DEDUP_LOGS": "0", "RAY_worker_niceness": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

log = logging.getLogger("ray_serve_peer")


def ensure_ray_venv(path: Path = RAY_VENV) -> Path:
    """The Python of the Ray venv at ``path``, created (a minute or two) when it is missing or unfinished.

    Returns:
        The venv's ``bin/python``.

    Raises:
        subprocess.CalledProcessError: ``venv`` or ``pip`` failed (pip's message says which pin conflicts).
    """
    python, marker = path / "bin" / "python", path / f".installed-ray-{RAY_VERSION}"
    if marker.exists():
        return python
    shutil.rmtree(path, ignore_errors=True)  # an unfinished one (no marker) is started again
    path.parent.mkdir(parents=True, exist_ok=True)
    log.warning("creating the Ray venv %s (ray[serve]==%s)", path, RAY_VERSION)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    site_packages = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip()
    project_site = sysconfig.get_paths()["purelib"]
    # addsitedir (not a bare path line) also runs the project's own .pth files: the editable kiln install's finder.
    (Path(site_packages) / "_kiln_project.pth").write_text(f"import site; site.addsitedir({project_site!r})\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c",
                    str(REPO / "requirements.lock"), f"ray[serve]=={RAY_VERSION}"], check=True)
    marker.touch()
    return python


def ray_serve_argv(bundle: Path, port: int, *, python: Path, replicas: int = 2, max_batch_size: int = 32,
                   batch_wait_s: float = 0.002, token: str = "", runtime: str = "auto",
                   max_ongoing_requests: int | None = None) -> list[str]:
    """The command line of this script serving ``bundle`` on ``port`` with the Ray venv's ``python``."""
    argv = [str(python), str(Path(__file__).resolve()), "--bundle", str(bundle), "--port", str(port),
            "--replicas", str(replicas), "--max-batch-size", str(max_batch_size), "--batch-wait-s", str(batch_wait_s),
            "--runtime", runtime]
    if max_ongoing_requests is not None:
        argv += ["--max-ongoing-requests", str(max_ongoing_requests)]
    return argv + (["--token", token] if token else [])


@dataclass
class RayServeHandle:
    """A running peer: its process group (the driver; Ray's processes die with it), URL and log."""

    proc: Any
    url: str
    health_url: str
    log_file: Path


def start_ray_serve(bundle: Path, port: int, *, log_file: Path, replicas: int = 2, max_batch_size: int = 32,
                    batch_wait_s: float = 0.002, token: str = "", runtime: str = "auto",
                    max_ongoing_requests: int | None = None, env: dict[str, str] | None = None,
                    venv: Path = RAY_VENV) -> RayServeHandle:
    """Start the peer in its own process group (dies with this process) and return once ``/health`` answers.

    Raises:
        RuntimeError: the peer exited or did not answer within ``START_TIMEOUT_S``; the message holds its log tail.
    """
    from kiln.tasks.processes import start_process, tail

    python = ensure_ray_venv(venv)
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | RAY_ENV | (env or {})
    argv = ray_serve_argv(bundle, port, python=python, replicas=replicas, max_batch_size=max_batch_size,
                          batch_wait_s=batch_wait_s, token=token, runtime=runtime,
                          max_ongoing_requests=max_ongoing_requests)
    proc = start_process(argv, output=log_file, cwd=REPO, env=environ, die_with_parent=True)
    handle = RayServeHandle(proc, f"http://127.0.0.1:{port}/predict", f"http://127.0.0.1:{port}/health", log_file)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if (code := proc.poll()) is not None:
            raise RuntimeError(f"the Ray Serve peer exited with {code} during start-up:\n{tail(log_file)}")
        if _get_ok(handle.health_url):
            return handle
        time.sleep(0.5)
    stop(handle)
    raise RuntimeError(f"the Ray Serve peer did not answer {handle.health_url} in {START_TIMEOUT_S:g} s:\n"
                       f"{tail(log_file)}")


def stop(handle: RayServeHandle) -> None:
    """SIGTERM the peer's supervisor alone (it has the driver shut Serve and Ray down, which needs Ray's processes
    alive, then sweeps), wait for it, then stop whatever is left. Safe to call twice."""
    if handle.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(handle.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            handle.proc.wait(timeout=STOP_GRACE_S + 10)
    handle.proc.stop(grace_s=5, what="Ray Serve peer")


def _get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def build_app(args: argparse.Namespace) -> Any:
    """The Serve application: one deployment, ``args.replicas`` replicas, batching as the flags say."""
    from ray import serve

    @serve.deployment(num_replicas=args.replicas, ray_actor_options={"num_cpus": 1},
                      # At least a batch per replica may be in flight, or batches never fill (Ray's advice).
                      max_ongoing_requests=args.max_ongoing_requests)
    class KilnBundle:
        def __init__(self, bundle: str, runtime: str, token: str) -> None:
            import torch

            from kiln.tasks.bundle.load import load_bundle

            torch.set_num_threads(1)
            self.bundle = load_bundle(bundle, runtime, threads=1)  # type: ignore[arg-type]
            self.head = b'{"model":"ray_serve_peer","version":"1","variant":"champion","predictions":'
            self.expected = f"Bearer {token}".encode() if token else b""

        @serve.batch(max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_s)
        async def predict(self, calls: list[list[dict[str, Any]]]) -> list[tuple[int, bytes]]:
            import numpy as np
            import orjson

            from kiln.tasks.bundle.load import RecordError
            from kiln.tasks.serving.inputs import transform

            answers: list[tuple[int, bytes]] = [(0, b"")] * len(calls)
            xs, sizes, at = [], [], []
            for i, records in enumerate(calls):
                try:
                    xs.append(transform(self.bundle, records))
                except RecordError as exc:
                    answers[i] = (422, orjson.dumps({"detail": exc.errors}))
                    continue
                sizes.append(len(records))
                at.append(i)
            if xs:
                y = self.bundle.predict_features(np.concatenate(xs) if len(xs) > 1 else xs[0])
                for i, part in zip(at, np.split(y, np.cumsum(sizes)[:-1]), strict=True):
                    answers[i] = (200, self.head + orjson.dumps(self.bundle.format_predictions(part)) + b"}")
            return answers

        async def __call__(self, request: Any) -> Any:
            import orjson
            from starlette.responses import Response

            from kiln.tasks.serving.inputs import RequestError, parse_records

            if request.url.path.rstrip("/") == "/health":
                return Response(b'{"status":"ok"}', media_type="application/json")
            if request.method != "POST" or request.url.path.rstrip("/") != "/predict":
                return Response(b'{"detail":"not found"}', 404, media_type="application/json")
            if self.expected and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                                         self.expected):
                return Response(b'{"detail":"missing or invalid bearer token"}', 401, media_type="application/json")
            try:
                records = parse_records(await request.body(), args.max_records)
            except RequestError as exc:
                return Response(orjson.dumps({"detail": exc.detail}), exc.status, media_type="application/json")
            status, body = await self.predict(records)
            return Response(body, status, media_type="application/json")

    return KilnBundle.bind(str(args.bundle), args.runtime, args.token)


def serve_forever(args: argparse.Namespace) -> None:
    """Start Ray and Serve, serve until SIGTERM or SIGINT, then shut both down."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions
    from ray.serve.schema import LoggingConfig

    stopping = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        log.warning("Ray Serve peer: %s, shutting Serve and Ray down", signal.Signals(signum).name)
        stopping.set()

    os.environ.update(RAY_ENV)  # read by the Ray processes this driver starts
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, object_store_memory=200 * 1024 * 1024,
             logging_level=logging.WARNING, log_to_driver=True)
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, whose core worker installs its own
            signal.signal(sig, on_signal)
        quiet = LoggingConfig(log_level="WARNING", enable_access_log=False)
        serve.start(http_options=HTTPOptions(host=args.host, port=args.port), logging_config=quiet)
        serve.run(build_app(args), name="kiln_peer", route_prefix="/", logging_config=quiet)
        log.warning("Ray Serve peer: %s on http://%s:%d/predict, %d replicas, batches of <= %d requests waiting "
                    "<= %g s", args.bundle, args.host, args.port, args.replicas, args.max_batch_size,
                    args.batch_wait_s)
        while not stopping.wait(1.0):
            pass
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="a kiln bundle folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=32, help="most requests per batch (@serve.batch)")
    parser.add_argument("--batch-wait-s", type=float, default=0.002, help="longest wait for a batch to fill")
    parser.add_argument("--max-ongoing-requests", type=int, default=None,
                        help="requests in flight per replica (default: --max-batch-size)")
    parser.add_argument("--max-records", type=int, default=512, help="most records per request (413 beyond), as "
                        "the model server's --max-batch")
    parser.add_argument("--runtime", default="auto", choices=["auto", "onnx", "torch"])
    parser.add_argument("--token", default="", help="bearer token wanted on /predict (default: none)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs Ray may use (ray.init num_cpus)")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)  # the supervised child
    args = parser.parse_args(argv)
    if args.max_ongoing_requests is None:
        args.max_ongoing_requests = args.max_batch_size
    if min(args.replicas, args.max_batch_size, args.max_ongoing_requests, args.max_records) < 1 \
            or args.batch_wait_s < 0 or args.replicas > args.num_cpus:
        parser.error("--replicas (<= --num-cpus), --max-batch-size, --max-ongoing-requests and --max-records must "
                     "be >= 1, --batch-wait-s >= 0")
    args.bundle = args.bundle.resolve()
    return args


def supervise(argv: list[str]) -> int:
    """Run the Ray driver (this script with ``--driver``) as a child in a process group of its own, and stop what
    is left of that group when it exits, however it exits: Ray's dashboard and runtime-env agents outlive a driver
    that was killed. SIGTERM or SIGINT here is passed to the driver first (it shuts Serve and Ray down).

    Returns:
        The driver's exit code.
    """
    from kiln.tasks.processes import OutputLog, start_process

    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopping.set())
    output = OutputLog(on_line=lambda line: print(line, flush=True))
    driver = start_process([sys.executable, str(Path(__file__).resolve()), "--driver", *argv], output=output,
                           die_with_parent=True)
    while driver.poll() is None and not stopping.wait(0.5):
        pass
    if driver.poll() is None:
        os.kill(driver.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            driver.wait(timeout=STOP_GRACE_S)
    driver.stop(grace_s=5, what="the Ray Serve peer's processes")
    driver.join_output(5)
    code = driver.wait()
    return 128 - code if code < 0 else code  # a driver killed by signal N: 128 + N, as a shell reports it


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if not args.driver:
        return supervise(argv)
    from kiln.tasks.parent_death import die_with_parent

    die_with_parent(signal.SIGTERM)  # the supervisor is gone: shut Ray down rather than be killed mid-way
    serve_forever(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
