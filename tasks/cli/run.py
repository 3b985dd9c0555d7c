"""``kiln run``: run a pipeline once through Airflow, in this process (what ``make demo`` does).

Before Airflow starts, the pipeline's spec and the ``--conf`` Params are checked: a typo or a bad value is one line
naming the file and the field, not a traceback. Airflow's home follows ``KILN_HOME`` unless ``AIRFLOW_HOME`` is
set, and its metadata database is set up on first use. Running a DAG is Airflow's business, and this package never
imports Airflow: the command hands the process to the DAG runner of :mod:`kiln.operators.runner` (an exec, so it
stays one process with the same pid and terminal).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from kiln.tasks.cli.help import add_command
from kiln.tasks.settings import REPO_ROOT, get_settings
from kiln.tasks.spec import SpecError, load_specs
from kiln.tasks.spec.yaml_reader import read_spec_yaml

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


def check_pipeline(pipeline: str, conf_text: str) -> str | None:
    """Why ``pipeline`` cannot run with ``conf_text`` (one line per problem), or ``None`` when it can.

    The spec files of the pipelines folder are read as the DAG factory reads them; the Params are applied as a
    run would apply them.
    """
    try:
        conf = json.loads(conf_text)
    except json.JSONDecodeError as exc:
        return f"--conf is not valid JSON ({exc}); give a JSON object, e.g. '{{\"epochs\": 5}}'"
    if not isinstance(conf, dict):
        return "--conf must be a JSON object of Params, e.g. '{\"epochs\": 5}'"
    folder = get_settings().pipelines_dir
    valid, errors = load_specs(folder)
    specs = {spec.name: spec for _, spec in valid}
    if pipeline not in specs:
        own = [e for e in errors if _declares(Path(e.source), pipeline)]
        if own:  # the pipeline's own spec file is invalid: that is the whole story
            return _one_line(own[0])
        names = ", ".join(sorted(specs)) or "none"
        lines = [f"no valid pipeline named '{pipeline}' in {folder} (valid pipelines: {names})"]
        return "\n".join([*lines, *(_one_line(e) for e in errors)])
    try:
        specs[pipeline].with_overrides(conf, source=f"--conf of {pipeline}")
    except SpecError as exc:
        return _one_line(exc)
    return None


def _declares(path: Path, pipeline: str) -> bool:
    """Whether the (invalid) spec file ``path`` is meant to be ``pipeline``: named so, or its ``name`` says so."""
    if path.stem == pipeline:
        return True
    try:
        data = read_spec_yaml(path)  # bounded: this file is already known to be invalid, maybe hostile
    except SpecError:
        return False
    return isinstance(data, dict) and data.get("name") == pipeline


def _one_line(error: SpecError) -> str:
    where = error.source if error.source.startswith("--conf") else f"pipeline spec {error.source}"
    return f"invalid {where}: {'; '.join(error.problems)}"


def airflow_environment(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` with Airflow's defaults for a kiln run filled in (what the Makefile exports): its home under
    ``KILN_HOME``, kiln's DAG folder, no example DAGs. A variable already set is kept."""
    home = get_settings(environ).home
    defaults = {"AIRFLOW_HOME": str(home / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "GX_ANALYTICS_ENABLED": "false", "MPLBACKEND": "Agg"}
    if (REPO_ROOT / "dags").is_dir():
        defaults["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO_ROOT / "dags")
    return {**defaults, **environ}


def _run(args: argparse.Namespace) -> int:
    problem = check_pipeline(args.pipeline, args.conf)
    if problem:
        print(f"kiln run: {problem}", file=sys.stderr)
        return 2
    argv = [sys.executable, "-m", RUNNER_MODULE, args.pipeline, "--conf", args.conf,
            *(["--log", args.log] if args.log else [])]
    env = airflow_environment(dict(os.environ))
    sys.stdout.flush()
    os.execve(sys.executable, argv, env)
    return 1  # not reached: execve replaces this process
