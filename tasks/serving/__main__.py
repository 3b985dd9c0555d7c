"""``python -m kiln.tasks.serving --deployment PATH``: run the model server (uvicorn, uvloop, httptools, one process).

The deployment is loaded (bundles loaded and warmed) before the port is opened; a missing or invalid deployment
file or bundle exits with code 2 and a message naming it. SIGHUP reloads the deployment file (like
``POST /admin/reload``); SIGTERM stops gracefully (in-flight requests finish). The kiln token (every right) comes
from ``KILN_SERVE_TOKEN`` or the serving token file (``kiln.tasks.serving.auth.resolve_token``); scoped tokens from
the tokens file (``kiln.tasks.serving.tokens``, ``kiln serve token add``). The limits on bodies, read times and
connections are the flags of ``kiln.tasks.serving.limits``; the descriptor limit is raised to its hard limit. The
models run with ``--runtime`` (default ``KILN_SERVE_RUNTIME``, else ``auto``: ONNX Runtime for a bundle with
``model.onnx``, else the exported torch program); ``GET /ready`` names each served version's runtime.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kiln.tasks.serving.limits import add_limit_arguments, limits_from_args, raise_descriptor_limit
from kiln.tasks.settings import SERVE_RUNTIMES

#: Exit code of a server that cannot load its deployment.
EXIT_BAD_DEPLOYMENT = 2
#: Seconds in-flight requests get to finish after SIGTERM.
GRACEFUL_SHUTDOWN_S = 30


def _parser(default_host: str, default_port: int, default_tokens: str, default_runtime: str
            ) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kiln.tasks.serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deployment", required=True, help="the deployment file (JSON) to serve")
    parser.add_argument("--host", default=default_host, help=f"listen address (default {default_host}, "
                        "KILN_SERVE_HOST)")
    parser.add_argument("--port", type=int, default=default_port, help=f"listen port (default {default_port}, "
                        "KILN_SERVE_PORT)")
    parser.add_argument("--max-batch", type=int, default=512, help="the most records per request and rows per "
                        "forward pass (default 512); larger requests get 413")
    parser.add_argument("--max-wait-ms", type=float, default=0.0, help="how long a batch waits for more requests "
                        "(default 0: it takes what is queued when the event loop is idle)")
    parser.add_argument("--runtime", default=default_runtime, choices=SERVE_RUNTIMES, help="what runs the models: "
                        "onnx (ONNX Runtime on a bundle's model.onnx), torch (the exported program model.pt2) or "
                        f"auto (onnx when the bundle has model.onnx, else torch); default {default_runtime}, "
                        "KILN_SERVE_RUNTIME")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the runtime, torch or ONNX "
                        "Runtime (default 1: the server serves on one core; run more processes to use more)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the canary routing (default: random)")
    parser.add_argument("--tokens-file", default=default_tokens, help="the scoped tokens (default "
                        f"{default_tokens}, under KILN_SERVING_DIR; see kiln serve token add); re-read when it changes")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--capture-flush-s", type=float, default=10.0, help="seconds between two writes of "
                        "captured requests and feedback to the artifact store (default 10; the share captured is "
                        "the deployment file's capture.share)")
    parser.add_argument("--capture-flush-rows", type=int, default=10_000, help="write as soon as this many captured "
                        "records wait (default 10000)")
    parser.add_argument("--capture-max-rows", type=int, default=50_000, help="most captured records (and feedback "
                        "rows) held in memory; past it new ones are dropped and counted (default 50000)")
    add_limit_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the server until it is stopped.

    Returns:
        The exit code: 0 after a clean stop, 2 when the deployment cannot be loaded.
    """
    from kiln.tasks.serving.tokens import TOKENS_FILE
    from kiln.tasks.settings import get_settings

    try:
        settings = get_settings()
    except ValueError as exc:
        print(f"python -m kiln.tasks.serving: {exc}", file=sys.stderr)
        return EXIT_BAD_DEPLOYMENT
    args = _parser(settings.serve_host, settings.serve_port, str(settings.serving_dir / TOKENS_FILE),
                   settings.serve_runtime).parse_args(argv)
    try:
        if args.max_batch < 1 or args.max_wait_ms < 0 or args.threads < 1:
            raise ValueError("--max-batch and --threads must be >= 1 and --max-wait-ms >= 0")
        limits = limits_from_args(args)
        descriptors = raise_descriptor_limit()
        connection_cap = limits.connection_cap(descriptors)
    except ValueError as exc:
        print(f"python -m kiln.tasks.serving: {exc}", file=sys.stderr)
        return EXIT_BAD_DEPLOYMENT
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch
    import uvicorn

    from kiln.tasks.serving.app import ServerState, create_app
    from kiln.tasks.serving.auth import resolve_token
    from kiln.tasks.serving.capture import CaptureOptions
    from kiln.tasks.serving.deployment import DeploymentError, read_deployment
    from kiln.tasks.serving.metrics import ServerMetrics
    from kiln.tasks.serving.models import ModelLoadError, build_model_set, freeze_heap, load_bundles
    from kiln.tasks.serving.protocol import limited_protocol
    from kiln.tasks.serving.tokens import TokenFileError

    torch.set_num_threads(args.threads)  # the torch runtimes' threads; ONNX Runtime sessions take the same number
    metrics = ServerMetrics()
    try:
        deployment = read_deployment(args.deployment)
        models = build_model_set(deployment, load_bundles(deployment, {}, args.runtime), metrics,
                                 max_batch=args.max_batch, max_wait_s=args.max_wait_ms / 1000)
        token = resolve_token(settings)
        state = ServerState(args.deployment, models, metrics, token, max_batch=args.max_batch,
                            max_wait_s=args.max_wait_ms / 1000, seed=args.seed, tokens_file=Path(args.tokens_file),
                            runtime=args.runtime,
                            capture_options=CaptureOptions(max_rows=args.capture_max_rows,
                                                           flush_rows=args.capture_flush_rows,
                                                           flush_s=args.capture_flush_s))
    except (DeploymentError, ModelLoadError, TokenFileError, ValueError, OSError) as exc:
        print(f"python -m kiln.tasks.serving: cannot serve {args.deployment}: {exc}", file=sys.stderr)
        return EXIT_BAD_DEPLOYMENT
    freeze_heap()
    logging.getLogger(__name__).info("serving %s (champion %s, canary %s; runtime %s, %d thread(s)) on http://%s:%d",
                                     deployment.model, deployment.champion.version,
                                     deployment.canary.version if deployment.canary else "none", args.runtime,
                                     args.threads, args.host, args.port)
    logging.getLogger(__name__).info(
        "limits: bodies up to %d bytes, headers within %g s, bodies within %g s, idle connections closed after %g s, "
        "at most %d connections (descriptor limit %d)", limits.max_body_bytes, limits.header_timeout_s,
        limits.body_timeout_s, limits.idle_timeout_s, connection_cap, descriptors)
    # log_config=None: uvicorn's loggers propagate to the root handler set up above (one format for all lines).
    # The protocol class enforces the limits (see protocol.py for what uvicorn itself lacks); uvicorn's own
    # keep-alive timeout is the idle limit, so that both close an idle connection at the same time.
    protocol = limited_protocol(limits, connection_cap, metrics.count_connection_ended)
    uvicorn.run(create_app(state), host=args.host, port=args.port, loop="uvloop", http=protocol, lifespan="on",
                access_log=False, log_config=None, timeout_keep_alive=limits.idle_timeout_s,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    return 0


if __name__ == "__main__":
    sys.exit(main())
