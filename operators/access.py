"""Who may see and trigger a pipeline's DAG: its team's role (``access_control``), under kiln's FAB auth manager."""

from __future__ import annotations

from airflow.sdk import conf

from kiln.tasks.services.auth import TEAM_DAG_ACCESS, team_role
from kiln.tasks.services.environment import FAB_AUTH_MANAGER


def team_access_control(team: str) -> dict[str, dict[str, set[str]]] | None:
    """The ``access_control`` of a DAG of ``team``: its role reads and edits (so triggers) it.

    None under any other auth manager: the simple one has no roles, and a FAB auth manager that kiln does not set
    up lacks the team roles (Airflow would refuse the DAG for naming a missing role).
    """
    if conf.get("core", "auth_manager", fallback="") != FAB_AUTH_MANAGER:
        return None
    return {team_role(team): {resource: set(actions) for resource, actions in TEAM_DAG_ACCESS.items()}}
