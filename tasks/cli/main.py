"""kiln: the platform's command line, in the style of airflow and mlflow (a verb per subcommand).

    kiln run PIPELINE [--conf JSON]       run a pipeline once through Airflow, in this process
    kiln models list|history|rollback|approve ...
                                          the registered models, their champions, approvals and rollbacks
    kiln pools status|metrics|reap|release ...
                                          the resource pools: capacity, usage, queues and leases
    kiln serve start|stop                 the model servers of the deployed pipelines
    kiln up|down|status                   the platform as services: Airflow (UI, REST), MLflow, model servers

kiln COMMAND --help says more about each, with examples.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kiln.tasks.cli import models, pools, run, serve, services


def parser() -> argparse.ArgumentParser:
    """The ``kiln`` parser; each subcommand's module adds its own."""
    top = argparse.ArgumentParser(prog="kiln", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (run, models, pools, serve, services):
        module.add_commands(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kiln``; returns the exit code of the subcommand."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`kiln pools status | head`): not an error of kiln
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
