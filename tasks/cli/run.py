"""``kiln run``: run a pipeline once through Airflow, in this process (what ``make demo`` does).

Running a DAG is Airflow's business, and this package never imports Airflow: the command hands the process to the
DAG runner of :mod:`kiln.operators.runner` (an exec, so it stays one process with the same pid and terminal).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from kiln.tasks.cli.help import add_command

RUNNER_MODULE = "kiln.operators.runner"


def add_commands(sub: Any) -> None:
    """Add ``kiln run``."""
    run = add_command(sub, "run", "run a pipeline once through Airflow in this process and summarise it",
                      "  kiln run penguins_species\n"
                      "  kiln run digits_cnn --conf '{\"epochs\": 3}' --log -")
    run.add_argument("pipeline", help="the pipeline's name (its DAG id)")
    run.add_argument("--conf", default="{}", help="JSON object of trigger-time Params, e.g. '{\"epochs\": 5}'")
    run.add_argument("--log", help="where Airflow's and the tasks' output goes (default: "
                                   "$KILN_HOME/logs/<pipeline>.log); '-' keeps it on the terminal")
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    argv = [sys.executable, "-m", RUNNER_MODULE, args.pipeline, "--conf", args.conf,
            *(["--log", args.log] if args.log else [])]
    sys.stdout.flush()
    os.execv(sys.executable, argv)
    return 1  # not reached: execv replaces this process
