"""``kiln-models``: the registered models of the pipelines, their champions, approvals and rollbacks.

    kiln-models list MODEL [--json]          versions, aliases, gate decisions and provenance tags
    kiln-models history MODEL [--json]       every move of the champion alias (who, when, why)
    kiln-models rollback MODEL [--to V] --reason TEXT
                                             champion back to the previous champion (or version V); the model
                                             server, if running, serves it at once
    kiln-models approve MODEL VERSION --reason TEXT
                                             an explicit approval: make VERSION champion without a passing gate
    kiln-models serve --json                 start (or reload) the model server of every deployed pipeline
    kiln-models stop                         stop every model server the pipelines started

The same moves run in Airflow as the ``kiln_champion`` DAG.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
from typing import Any

from kiln.tasks.settings import get_settings
from kiln.tasks.spec import load_specs, spec_named


def _list(args: argparse.Namespace) -> Any:
    from kiln.tasks.tracking.registry import Registry

    rows = [v.to_dict() for v in Registry.from_settings().versions(args.model)]
    if args.json:
        return rows
    if not rows:
        return f"model '{args.model}' has no registered versions"
    lines = [f"{'version':>7}  {'aliases':<10} {'gate':<7} {'run':<40} reason"]
    for v in rows:
        tags = v["tags"]
        lines.append(f"{v['version']:>7}  {','.join(v['aliases']) or '-':<10} {tags.get('kiln.gate', '-'):<7} "
                     f"{tags.get('kiln.run_key', '-'):<40} {tags.get('kiln.gate_reason', '')[:100]}")
    return "\n".join(lines)


def _history(args: argparse.Namespace) -> Any:
    from kiln.tasks.tracking.registry import Registry

    rows = Registry.from_settings().history(args.model)
    if args.json:
        return rows
    return "\n".join(f"{h['at']}  {h['previous'] or '-':>4} -> {h['version']:<4} {h['action']:<8} by {h['actor']}: "
                     f"{h['reason']}" for h in rows) or f"the champion of '{args.model}' has never moved"


def _move(args: argparse.Namespace) -> Any:
    from kiln.tasks.pipeline.champion import set_champion

    actor = args.actor or f"cli:{getpass.getuser()}"
    move = set_champion(spec_named(args.model), args.version, action=args.command, reason=args.reason, actor=actor)
    if args.json:
        return move.to_dict()
    served = f"; served at {move.url}" if move.url else " (the model is not being served)"
    return f"{move.model}: champion {move.previous or 'none'} -> {move.champion}{served}"


def _serve(args: argparse.Namespace) -> Any:
    from kiln.tasks.pipeline.endpoint import Endpoint

    urls = {}
    for _path, spec in load_specs(get_settings().pipelines_dir)[0]:
        endpoint = Endpoint.of(spec)
        if (deployment := endpoint.current()) is not None:
            urls[spec.name] = endpoint.serve(deployment).url
    return urls


def _stop(args: argparse.Namespace) -> Any:
    from kiln.tasks.serving.process import stop_servers

    return f"stopped: {', '.join(stop_servers(get_settings().serving_dir)) or 'none running'}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kiln-models``; returns the exit code (2 for a request that cannot be carried out)."""
    parser = argparse.ArgumentParser(prog="kiln-models", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func in (("list", _list), ("history", _history)):
        p = sub.add_parser(name)
        p.add_argument("model")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)
    rollback = sub.add_parser("rollback", help="champion back to the previous champion or --to VERSION")
    rollback.add_argument("model")
    rollback.add_argument("--to", dest="version", default=None)
    approve = sub.add_parser("approve", help="make VERSION champion by explicit approval")
    approve.add_argument("model")
    approve.add_argument("version")
    for p in (rollback, approve):
        p.add_argument("--reason", required=True, help="why (recorded in the champion history)")
        p.add_argument("--actor", default=None, help="who (default cli:<user>)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=_move)
    serve = sub.add_parser("serve", help="start the model server of every pipeline that has a deployment")
    serve.add_argument("--json", action="store_true")
    serve.set_defaults(func=_serve)
    sub.add_parser("stop", help="stop every model server the pipelines started").set_defaults(func=_stop, json=False)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from kiln.tasks.tracking.registry import RegistryError

    try:
        out = args.func(args)
    except (LookupError, RegistryError) as exc:
        print(f"kiln-models: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2) if args.json else out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
