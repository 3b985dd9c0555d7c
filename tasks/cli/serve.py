"""``kiln serve``: the model servers of the pipelines that have been deployed (their deployment files)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from kiln.tasks.cli.help import add_command
from kiln.tasks.settings import get_settings


def add_commands(sub: Any) -> None:
    """Add ``kiln serve start|stop``."""
    serve = add_command(sub, "serve", "start or stop the model servers of the deployed pipelines",
                        "  kiln serve start          # start (or reload) every deployed pipeline's model server\n"
                        "  kiln serve start --json   # the same, printing {pipeline: url}\n"
                        "  kiln serve stop           # stop every model server the pipelines started")
    verbs = serve.add_subparsers(dest="verb", required=True, metavar="VERB")
    start = verbs.add_parser("start", help="start (or reload) the model server of every pipeline with a deployment")
    start.add_argument("--json", action="store_true", help="print {pipeline: url} as JSON")
    start.set_defaults(handler=_start)
    verbs.add_parser("stop", help="stop every model server the pipelines started").set_defaults(handler=_stop)


def _start(args: argparse.Namespace) -> int:
    from kiln.tasks.pipeline.endpoint import Endpoint
    from kiln.tasks.spec import load_specs

    urls = {}
    for _path, spec in load_specs(get_settings().pipelines_dir)[0]:
        endpoint = Endpoint.of(spec)
        if (deployment := endpoint.current()) is not None:
            urls[spec.name] = endpoint.serve(deployment).url
    if args.json:
        print(json.dumps(urls, indent=2))
    else:
        print("\n".join(f"{name}: {url}" for name, url in urls.items()) or "no pipeline has been deployed")
    return 0


def _stop(args: argparse.Namespace) -> int:
    from kiln.tasks.serving.process import stop_servers

    print(f"stopped: {', '.join(stop_servers(get_settings().serving_dir)) or 'none running'}")
    return 0
