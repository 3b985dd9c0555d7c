"""``kiln up|down|status``: the platform as services (:mod:`kiln.tasks.services.supervisor`)."""

from __future__ import annotations

import argparse
from typing import Any

from kiln.tasks.cli.help import add_command


def add_commands(sub: Any) -> None:
    """Add ``kiln up``, ``kiln down`` and ``kiln status``."""
    up = add_command(sub, "up", "start Airflow (UI + REST), MLflow and the model servers, and wait until healthy",
                     "  kiln up                    # embedded profile: SQLite, LocalExecutor\n"
                     "  KILN_PROFILE=prod kiln up  # PostgreSQL + CeleryExecutor on Redis")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for every component's health")
    up.set_defaults(handler=_action("up"))
    add_command(sub, "down", "stop everything `kiln up` started (whole process groups, no orphans)",
                "  kiln down").set_defaults(handler=_action("down"))
    add_command(sub, "status", "what runs, as JSON; exit 3 when the services are not running",
                "  kiln status").set_defaults(handler=_action("status"))


def _action(action: str) -> Any:
    def handler(args: argparse.Namespace) -> int:
        from kiln.tasks.services.supervisor import main

        return main([action, *(["--timeout", str(args.timeout)] if action == "up" else [])])

    return handler
