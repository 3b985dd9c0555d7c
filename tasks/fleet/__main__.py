"""``python -m kiln.tasks.fleet --deployment F --host H --port P [--run-dir D] [server flags...]``: serve a model
with replicas behind HAProxy (:mod:`kiln.tasks.fleet.fleet`) until SIGTERM.

Flags it does not know go to every replica's ``python -m kiln.tasks.serving``. SIGTERM stops it all: the balancer
first (no new requests), then the replicas (those in flight finish), then the leases are released. SIGHUP reloads
like ``POST /admin/reload``. It exits 2 when it cannot start, its deployment cannot be served or its balancer died
(the reason on standard error; the model-servers watchdog of ``kiln up`` starts it again), 0 after a stop.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from kiln.tasks.fleet.fleet import EXIT_BAD_DEPLOYMENT, Fleet

log = logging.getLogger("kiln.tasks.fleet")


def main(argv: list[str] | None = None) -> int:
    """Run the fleet until SIGTERM; exit 2 when it cannot start (the message names why)."""
    from kiln.tasks.fleet.admin import serve_admin
    from kiln.tasks.fleet.leases import ReplicaLeases
    from kiln.tasks.serving.auth import resolve_token
    from kiln.tasks.serving.deployment import read_deployment
    from kiln.tasks.settings import get_settings

    parser = argparse.ArgumentParser(prog="python -m kiln.tasks.fleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deployment", required=True, help="the model's deployment file (with replicas)")
    parser.add_argument("--host", required=True, help="the balancer's listen address (the model's endpoint)")
    parser.add_argument("--port", type=int, required=True, help="the balancer's port")
    parser.add_argument("--run-dir", default=".", help="where the balancer's files and the replicas' logs go "
                        "(default: the working folder; kiln starts the fleet in the model's serving folder)")
    args, replica_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per readiness poll otherwise
    try:
        deployment = read_deployment(args.deployment)
        fleet = Fleet(Path(args.deployment), host=args.host, port=args.port, run_dir=Path(args.run_dir).resolve(),
                      token=resolve_token(get_settings()), leases=ReplicaLeases.open(deployment),
                      replica_args=replica_args)
        admin = serve_admin(fleet)
        fleet.start_balancer(admin.server_address[1])
    except Exception as exc:  # noqa: BLE001 - the starter reads the reason from the log and the exit code
        print(f"python -m kiln.tasks.fleet: cannot serve {args.deployment}: {exc}", file=sys.stderr)
        return EXIT_BAD_DEPLOYMENT
    signal.signal(signal.SIGTERM, lambda *_: fleet.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: fleet.stopping.set())
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=_reload_on_signal, args=(fleet,),
                                                            daemon=True).start())
    log.info("watching the replicas of %s (min %d, max %d)", deployment.model, fleet.settings.min, fleet.settings.max)
    try:
        fleet.run()
    finally:
        admin.shutdown()
        fleet.shutdown()
    if fleet.fatal is not None:
        print(f"python -m kiln.tasks.fleet: {fleet.fatal}", file=sys.stderr)
        return EXIT_BAD_DEPLOYMENT
    return 0


def _reload_on_signal(fleet: Fleet) -> None:
    """SIGHUP: a rolling reload with the kiln token, its outcome logged (a signal has no caller to answer)."""
    from kiln.tasks.fleet.admin import rolling_reload

    status, body = rolling_reload(fleet, f"Bearer {fleet.token}")
    log.log(logging.INFO if status == 200 else logging.ERROR, "SIGHUP reload: %d %s", status, body)


if __name__ == "__main__":
    sys.exit(main())
