"""``kiln models``: the registered models of the pipelines, their champions, approvals and rollbacks.

The same moves run in Airflow as the ``kiln_champion`` DAG.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

from kiln.tasks.cli.help import add_command
from kiln.tasks.spec import spec_named


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
    from kiln.tasks.tracking.registry import ChampionMismatchError, Registry

    reg = Registry.from_settings()
    rows = reg.history(args.model)
    if args.json:
        return rows
    lines = [f"{h['at']}  {h['previous'] or '-':>4} -> {h['version']:<4} {h['action']:<8} by {h['actor']}: "
             f"{h['reason']}" for h in rows] or [f"the champion of '{args.model}' has never moved"]
    try:
        reg.champion(args.model)
    except ChampionMismatchError as exc:  # the history is what kiln did; say so when the alias disagrees
        lines.append(f"WARNING: {exc}")
    return "\n".join(lines)


def _move(args: argparse.Namespace) -> Any:
    from kiln.tasks.pipeline.champion import set_champion

    actor = args.actor or f"cli:{getpass.getuser()}"
    move = set_champion(spec_named(args.model), args.version, action=args.action, reason=args.reason, actor=actor)
    if args.json:
        return move.to_dict()
    served = f"; served at {move.url}" if move.url else " (the model is not being served)"
    return f"{move.model}: champion {move.previous or 'none'} -> {move.champion}{served}"


def add_commands(sub: Any) -> None:
    """Add ``kiln models`` and its subcommands."""
    models = add_command(sub, "models", "the registered models: versions, champions, approvals and rollbacks",
                         "  kiln models list penguins_species\n"
                         "  kiln models history penguins_species --json\n"
                         "  kiln models rollback penguins_species --reason 'complaints since v7'\n"
                         "  kiln models approve penguins_species 5 --reason 'reviewed by hand'")
    verbs = models.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, func, summary in (("list", _list, "versions, aliases, gate decisions and provenance tags"),
                                ("history", _history, "every move of the champion alias: who, when, why")):
        p = verbs.add_parser(name, help=summary, description=summary)
        p.add_argument("model", help="the pipeline's name (its registered model has the same name)")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(handler=_run(func))
    rollback = verbs.add_parser("rollback", help="champion back to the previous champion, or --to VERSION; served at "
                                "once if the model is being served")
    rollback.add_argument("model")
    rollback.add_argument("--to", dest="version", default=None, help="the version to go back to")
    approve = verbs.add_parser("approve", help="make VERSION champion by explicit approval, without a passing gate")
    approve.add_argument("model")
    approve.add_argument("version")
    for p, action in ((rollback, "rollback"), (approve, "approve")):
        p.add_argument("--reason", required=True, help="why (recorded in the champion history)")
        p.add_argument("--actor", default=None, help="who (default cli:<user>)")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(handler=_run(_move), action=action)


def _run(func: Any) -> Any:
    """A handler printing ``func``'s answer (JSON with ``--json``); exit 2 for a request that cannot be done."""

    def handler(args: argparse.Namespace) -> int:
        from kiln.tasks.pipeline.champion_lock import ChampionLockError
        from kiln.tasks.tracking.registry import RegistryError

        try:
            out = func(args)
        except (LookupError, RegistryError, ChampionLockError) as exc:
            print(f"kiln models: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(out, indent=2) if args.json else out)
        return 0

    return handler
