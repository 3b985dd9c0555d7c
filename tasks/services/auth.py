"""Who may do what in Airflow, in the ``prod`` profile: the roles and users ``kiln up`` keeps in Airflow's FAB auth
manager (``kiln.operators.auth_manager.KilnFabAuthManager``), and their generated passwords.

Three kinds of user: ``admin`` (FAB's ``Admin`` role: everything), ``viewer`` (FAB's ``Viewer``: sees every DAG,
run and log, changes nothing) and one operator per team, ``operator-<team>``, whose role ``team:<team>`` sees,
triggers, clears and pauses only the pipelines whose spec names that team (``team:``, default its ``owner``). The
team roles are created before the DAG processor starts, since Airflow refuses a DAG whose ``access_control`` names
a missing role; a pipeline of a new team needs ``kiln up`` again (which re-applies the roles while services run).

Nothing here imports Airflow: :func:`apply_auth` hands the plan to ``python -m kiln.operators.auth_manager`` on
its standard input (passwords never appear on a command line or in a log).
"""

from __future__ import annotations

import json
import logging
import secrets
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kiln.tasks.services.environment import FAB_AUTH_MANAGER, USERNAME, ServicePaths, write_private
from kiln.tasks.spec import load_specs

log = logging.getLogger(__name__)

ADMIN_ROLE, VIEWER_ROLE = "Admin", "Viewer"
VIEWER = "viewer"
TEAM_ROLE_PREFIX = "team:"
#: What a team role may do on each DAG of its team (``access_control``); what it may do with a DAG's runs, task
#: instances and logs comes from the role itself and applies only where it holds these.
TEAM_DAG_ACCESS: dict[str, set[str]] = {"DAGs": {"can_read", "can_edit"}}


def team_role(team: str) -> str:
    """The Airflow role of a team's operators."""
    return f"{TEAM_ROLE_PREFIX}{team}"


def team_operator(team: str) -> str:
    """The user name of a team's operator."""
    return f"operator-{team}"


def uses_kiln_fab(env: Mapping[str, str]) -> bool:
    """Whether ``env`` (a component environment) runs Airflow with kiln's FAB auth manager."""
    return env.get("AIRFLOW__CORE__AUTH_MANAGER") == FAB_AUTH_MANAGER


def pipeline_teams(pipelines_dir: Path) -> list[str]:
    """The teams of the valid specs in ``pipelines_dir`` (an invalid spec is named by the spec-errors DAG)."""
    return sorted({spec.access_team for _, spec in load_specs(pipelines_dir)[0]})


def ensure_passwords(paths: ServicePaths, usernames: list[str]) -> dict[str, str]:
    """The passwords of ``usernames`` from ``passwords.json``, generating those missing (the file stays 0600; an
    existing password is never replaced)."""
    current = json.loads(paths.passwords_file.read_text()) if paths.passwords_file.exists() else {}
    missing = [u for u in usernames if u not in current]
    if missing:
        current.update({u: secrets.token_urlsafe(16) for u in missing})
        paths.secrets_dir.mkdir(parents=True, exist_ok=True)
        write_private(paths.passwords_file, json.dumps(current, indent=1))
    return {u: current[u] for u in usernames}


def auth_plan(paths: ServicePaths, teams: list[str]) -> dict[str, Any]:
    """The roles and users of the prod profile for ``teams``: ``{"team_roles": [...], "users": [{"username",
    "role", "password"}, ...]}``."""
    users = {USERNAME: ADMIN_ROLE, VIEWER: VIEWER_ROLE, **{team_operator(t): team_role(t) for t in teams}}
    passwords = ensure_passwords(paths, list(users))
    return {"team_roles": [team_role(t) for t in teams],
            "users": [{"username": u, "role": r, "password": passwords[u]} for u, r in users.items()]}


def apply_auth(env: Mapping[str, str], paths: ServicePaths, pipelines_dir: Path, timeout: float = 300.0) -> None:
    """Create or update the roles and users of the specs' teams in Airflow's metadata DB (after its migration).

    Raises:
        RuntimeError: the command failed; the message holds its output's tail.
    """
    teams = pipeline_teams(pipelines_dir)
    plan = auth_plan(paths, teams)
    result = subprocess.run([sys.executable, "-m", "kiln.operators.auth_manager"], input=json.dumps(plan),
                            env=dict(env), cwd=paths.home, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"creating Airflow's roles and users exited {result.returncode}:\n"
                           f"{(result.stdout + result.stderr)[-3000:]}")
    log.info("Airflow roles and users applied: teams %s, users %s", teams, [u["username"] for u in plan["users"]])
