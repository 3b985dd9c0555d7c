"""``kiln up|down|status``: the platform as services (:mod:`kiln.tasks.services.supervisor`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from kiln.tasks.cli.help import add_command


def add_commands(sub: Any) -> None:
    """Add ``kiln up``, ``kiln down`` and ``kiln status``."""
    up = add_command(sub, "up", "start Airflow (UI + REST), MLflow and the model servers, and wait until healthy; "
                     "on a partly running set, start only what is dead",
                     "  kiln up                    # embedded profile: SQLite, LocalExecutor\n"
                     "  KILN_PROFILE=prod kiln up  # PostgreSQL + CeleryExecutor on Redis")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for every component's health")
    up.set_defaults(handler=_action("up"))
    add_command(sub, "down", "stop everything `kiln up` started (whole process groups, no orphans)",
                "  kiln down").set_defaults(handler=_action("down"))
    add_command(sub, "status", "what runs, as JSON: each component and each model server (running, restarting, "
                "dead or stopped; pid, port, restarts); exit 3 when a component or a model server is dead",
                "  kiln status").set_defaults(handler=_action("status"))


def _action(action: str) -> Any:
    def handler(args: argparse.Namespace) -> int:
        return main([action, *(["--timeout", str(args.timeout)] if action == "up" else [])])

    return handler


def main(argv: list[str] | None = None) -> int:
    """``up`` (start and wait), ``down`` (stop everything), ``status`` (print what runs)."""
    from kiln.tasks.services.supervisor import Service, ServiceError

    parser = argparse.ArgumentParser(prog="kiln", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for health (up)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        service = Service.from_environment()
    except ValueError as exc:
        parser.error(str(exc))
    if args.action == "down":
        killed = service.down()
        print("services stopped" + (f" (killed after the grace period: {killed})" if killed else ""))
        return 0
    if args.action == "status":
        status = service.status()
        print(json.dumps(status, indent=2))
        dead_server = any(s["state"] == "dead" for s in status["model_servers"].values())
        return 0 if status["running"] and not dead_server else 3
    try:
        state = service.up(timeout=args.timeout)
    except (ServiceError, RuntimeError) as exc:
        print(f"make up failed: {exc}", file=sys.stderr)
        return 1
    print(f"""
kiln is up ({state['profile']} profile)
  Airflow UI and REST API: {state['url']}   user {state['username']}, password in {state['credentials']}
  MLflow:                  {state['mlflow_url']}
  model servers:           {', '.join(f'{m} {u}' for m, u in (state.get('model_servers') or {}).items()) or 'none yet'}
  logs:                    {state['logs']}
  status:                  kiln status
  stop with:               make down""")
    return 0
