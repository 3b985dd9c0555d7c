"""``python -m kiln.tasks.pools`` (or ``kiln-pools``): look at and tend the resource pools.

    kiln-pools status            # pools, nodes, usage, queues and leases as a table
    kiln-pools status --json     # the same as JSON (LeaseStore.snapshot)
    kiln-pools metrics           # Prometheus text exposition
    kiln-pools reap [--loop 5]   # expire leases whose holders stopped heartbeating (once, or every 5 s)
    kiln-pools release LEASE_ID  # end a lease or cancel a queued request by hand

The store and inventory come from ``KILN_POOLS_DB_URL`` and ``KILN_POOLS_FILE`` unless ``--db`` / ``--inventory``
name others.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from kiln.tasks.pools.inventory import load_inventory
from kiln.tasks.pools.store import LeaseStore
from kiln.tasks.pools.view import render_metrics, render_status

logger = logging.getLogger("kiln.tasks.pools")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln-pools", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", help="SQLAlchemy URL of the lease store (default: KILN_POOLS_DB_URL)")
    parser.add_argument("--inventory", type=Path, help="inventory YAML (default: KILN_POOLS_FILE, else this machine)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="pools, nodes, usage, queues and leases")
    status.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    sub.add_parser("metrics", help="Prometheus text exposition")
    reap = sub.add_parser("reap", help="expire leases past their ttl and free their devices")
    reap.add_argument("--loop", type=float, metavar="SECONDS", help="keep reaping every SECONDS until interrupted")
    release = sub.add_parser("release", help="end a lease or cancel a queued request")
    release.add_argument("lease_id")
    release.add_argument("--reason", default="released by hand (kiln-pools release)")
    return parser


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


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (1 when ``release`` found nothing to release)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = _store(args)
    try:
        if args.command == "status":
            snapshot = store.snapshot()
            print(json.dumps(snapshot, indent=2, sort_keys=True) if args.json else render_status(snapshot))
        elif args.command == "metrics":
            sys.stdout.write(render_metrics(store.snapshot()))
        elif args.command == "reap":
            return _reap(store, args.loop)
        elif args.command == "release":
            changed = store.release(args.lease_id, reason=args.reason)
            print(f"{args.lease_id}: {'released' if changed else 'already ended or unknown; nothing to do'}")
            return 0 if changed else 1
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
