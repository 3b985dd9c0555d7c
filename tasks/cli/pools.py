"""``kiln pools``: look at and tend the resource pools.

The store and inventory come from ``KILN_POOLS_DB_URL`` and ``KILN_POOLS_FILE`` unless ``--db`` / ``--inventory``
name others.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from kiln.tasks.cli.help import add_command
from kiln.tasks.pools.inventory import load_inventory
from kiln.tasks.pools.store import LeaseStore
from kiln.tasks.pools.view import render_metrics, render_status


def add_commands(sub: Any) -> None:
    """Add ``kiln pools`` and its subcommands."""
    pools = add_command(sub, "pools", "the resource pools: capacity, usage, queues and leases",
                        "  kiln pools status            # pools, nodes, usage, queues and leases as a table\n"
                        "  kiln pools status --json     # the same as JSON\n"
                        "  kiln pools metrics           # Prometheus text exposition\n"
                        "  kiln pools reap --loop 5     # expire leases whose holders stopped heartbeating\n"
                        "  kiln pools release LEASE_ID  # end a lease or cancel a queued request by hand")
    pools.add_argument("--db", help="SQLAlchemy URL of the lease store (default: KILN_POOLS_DB_URL)")
    pools.add_argument("--inventory", type=Path, help="inventory YAML (default: KILN_POOLS_FILE, else this machine)")
    pools.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    pools.set_defaults(handler=_handle)
    verbs = pools.add_subparsers(dest="verb", required=True, metavar="VERB")
    status = verbs.add_parser("status", help="pools, nodes, usage, queues and leases")
    status.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    verbs.add_parser("metrics", help="Prometheus text exposition")
    reap = verbs.add_parser("reap", help="expire leases past their ttl and free their devices")
    reap.add_argument("--loop", type=float, metavar="SECONDS", help="keep reaping every SECONDS until interrupted")
    release = verbs.add_parser("release", help="end a lease or cancel a queued request")
    release.add_argument("lease_id")
    release.add_argument("--reason", default="released by hand (kiln pools release)")


def _store(args: argparse.Namespace) -> LeaseStore:
    from kiln.tasks.settings import get_settings

    settings = get_settings()
    inventory = load_inventory(args.inventory or settings.pools_file)
    return LeaseStore(args.db or settings.pools_db_url, inventory)


def _reap(store: LeaseStore, loop_s: float | None) -> int:
    while True:
        expired = store.reap()
        if expired:
            print(f"expired {len(expired)} lease(s): {' '.join(expired)}", flush=True)
        if loop_s is None:
            return 0
        time.sleep(loop_s)


def _handle(args: argparse.Namespace) -> int:
    """Run one verb; exit 1 when ``release`` found nothing to release."""
    store = _store(args)
    try:
        if args.verb == "status":
            snapshot = store.snapshot()
            print(json.dumps(snapshot, indent=2, sort_keys=True) if args.json else render_status(snapshot))
        elif args.verb == "metrics":
            sys.stdout.write(render_metrics(store.snapshot()))
        elif args.verb == "reap":
            return _reap(store, args.loop)
        elif args.verb == "release":
            changed = store.release(args.lease_id, reason=args.reason)
            print(f"{args.lease_id}: {'released' if changed else 'already ended or unknown; nothing to do'}")
            return 0 if changed else 1
        return 0
    finally:
        store.close()
