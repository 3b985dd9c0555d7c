"""``python -m kiln.tasks.serving --deployment PATH``: run the model server (uvicorn, uvloop, httptools, one process).

The deployment is loaded (bundles loaded and warmed) before the port is opened; a missing or invalid deployment
file or bundle exits with code 2 and a message naming it. SIGHUP reloads the deployment file (like
``POST /admin/reload``); SIGTERM stops gracefully (in-flight requests finish). The bearer token comes from
``KILN_SERVE_TOKEN`` or the serving token file (``kiln.tasks.serving.auth.resolve_token``).
"""

from __future__ import annotations

import argparse
import logging
import sys

#: Exit code of a server that cannot load its deployment.
EXIT_BAD_DEPLOYMENT = 2
#: Seconds in-flight requests get to finish after SIGTERM.
GRACEFUL_SHUTDOWN_S = 30


def _parser(default_host: str, default_port: int) -> argparse.ArgumentParser:
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
    parser.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (default 1: the "
                        "server serves on one core; run more processes to use more)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the canary routing (default: random)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the server until it is stopped.

    Returns:
        The exit code: 0 after a clean stop, 2 when the deployment cannot be loaded.
    """
    from kiln.tasks.settings import get_settings

    settings = get_settings()
    args = _parser(settings.serve_host, settings.serve_port).parse_args(argv)
    if args.max_batch < 1 or args.max_wait_ms < 0 or args.torch_threads < 1:
        print("python -m kiln.tasks.serving: --max-batch and --torch-threads must be >= 1 and --max-wait-ms >= 0",
              file=sys.stderr)
        return EXIT_BAD_DEPLOYMENT
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch
    import uvicorn

    from kiln.tasks.serving.app import ServerState, create_app
    from kiln.tasks.serving.auth import resolve_token
    from kiln.tasks.serving.deployment import DeploymentError, read_deployment
    from kiln.tasks.serving.metrics import ServerMetrics
    from kiln.tasks.serving.models import ModelLoadError, build_model_set, freeze_heap, load_bundles

    torch.set_num_threads(args.torch_threads)
    metrics = ServerMetrics()
    try:
        deployment = read_deployment(args.deployment)
        models = build_model_set(deployment, load_bundles(deployment, {}), metrics, max_batch=args.max_batch,
                                 max_wait_s=args.max_wait_ms / 1000)
        token = resolve_token(settings)
    except (DeploymentError, ModelLoadError, ValueError, OSError) as exc:
        print(f"python -m kiln.tasks.serving: cannot serve {args.deployment}: {exc}", file=sys.stderr)
        return EXIT_BAD_DEPLOYMENT
    freeze_heap()
    state = ServerState(args.deployment, models, metrics, token, max_batch=args.max_batch,
                        max_wait_s=args.max_wait_ms / 1000, seed=args.seed)
    logging.getLogger(__name__).info("serving %s (champion %s, canary %s) on http://%s:%d", deployment.model,
                                     deployment.champion.version,
                                     deployment.canary.version if deployment.canary else "none", args.host,
                                     args.port)
    # log_config=None: uvicorn's loggers propagate to the root handler set up above (one format for all lines).
    uvicorn.run(create_app(state), host=args.host, port=args.port, loop="uvloop", http="httptools",
                lifespan="on", access_log=False, log_config=None, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    return 0


if __name__ == "__main__":
    sys.exit(main())
