"""Who may do what: the prod profile runs Airflow's FAB auth manager with throttled logins, ``kiln up`` plans one
operator per team with a generated private password, and a DAG grants its spec's team (default: its owner).

The roles at work against a running api-server: ``tests/integration/test_auth_roles.py``.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import yaml

from kiln.tasks.services.auth import auth_plan, pipeline_teams, uses_kiln_fab
from kiln.tasks.services.environment import (
    AUTH_MANAGER,
    FAB_AUTH_MANAGER,
    ServicePaths,
    ensure_secrets,
    service_environment,
)
from kiln.tasks.settings import get_service_settings
from kiln.tasks.spec import SpecError, parse_spec

MINIMAL = {"name": "m", "source": {"uri": "/data/x.csv"}, "target": "y", "task": "classification"}


def _env(tmp_path: Path, **base: str) -> dict[str, str]:
    environ = {"PATH": "/usr/bin", **base}
    return service_environment(get_service_settings(environ), ServicePaths(tmp_path), environ)


def test_prod_runs_the_fab_auth_manager_with_throttled_logins_and_embedded_keeps_the_simple_one(
        tmp_path: Path) -> None:
    prod = _env(tmp_path, KILN_PROFILE="prod")
    assert prod["AIRFLOW__CORE__AUTH_MANAGER"] == FAB_AUTH_MANAGER and uses_kiln_fab(prod)
    assert prod["AIRFLOW__FAB__AUTH_RATE_LIMITED"] == "True"
    assert prod["AIRFLOW__FAB__AUTH_RATE_LIMIT"] == "5 per 40 second"
    embedded = _env(tmp_path)
    assert embedded["AIRFLOW__CORE__AUTH_MANAGER"] == AUTH_MANAGER and not uses_kiln_fab(embedded)
    assert _env(tmp_path, AIRFLOW__CORE__AUTH_MANAGER=FAB_AUTH_MANAGER)["AIRFLOW__CORE__AUTH_MANAGER"] == \
        FAB_AUTH_MANAGER


def test_the_plan_has_an_operator_per_team_with_a_private_password_kept_across_runs(tmp_path: Path) -> None:
    paths = ServicePaths(tmp_path)
    admin_password = ensure_secrets(paths)["password"]
    first = auth_plan(paths, ["alpha", "beta"])
    assert first["team_roles"] == ["team:alpha", "team:beta"]
    roles = {u["username"]: u["role"] for u in first["users"]}
    assert roles == {"admin": "Admin", "viewer": "Viewer", "operator-alpha": "team:alpha",
                     "operator-beta": "team:beta"}
    stored = json.loads(paths.passwords_file.read_text())
    assert stored["admin"] == admin_password
    assert all(stored[u["username"]] == u["password"] and len(u["password"]) >= 16 for u in first["users"])
    assert stat.S_IMODE(paths.passwords_file.stat().st_mode) == 0o600
    again = auth_plan(paths, ["alpha", "beta", "gamma"])
    assert {u["username"]: u["password"] for u in again["users"] if u["username"] != "operator-gamma"} == \
        {u["username"]: u["password"] for u in first["users"]}


def test_a_spec_team_defaults_to_its_owner_and_is_one_word(tmp_path: Path) -> None:
    assert parse_spec({**MINIMAL, "owner": "fraud"}, "m.yaml").access_team == "fraud"
    assert parse_spec({**MINIMAL, "owner": "fraud", "team": "risk"}, "m.yaml").access_team == "risk"
    with pytest.raises(SpecError, match="field 'team'"):
        parse_spec({**MINIMAL, "team": "risk team"}, "m.yaml")
    for name, team in (("a", "risk"), ("b", None), ("c", "risk")):
        spec = {**MINIMAL, "name": name, "team": team, "source": {"uri": "x.csv"}}  # inside the data roots
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "bad.yaml").write_text("name: [")
    assert pipeline_teams(tmp_path) == ["ml-platform", "risk"]


def test_a_dag_grants_its_team_only_under_kilns_fab_auth_manager(monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.operators.access import team_access_control

    monkeypatch.setenv("AIRFLOW__CORE__AUTH_MANAGER", FAB_AUTH_MANAGER)
    assert team_access_control("risk") == {"team:risk": {"DAGs": {"can_read", "can_edit"}}}
    # Another deployment's FAB lacks kiln's team roles, and Airflow would refuse a DAG naming a missing role.
    monkeypatch.setenv("AIRFLOW__CORE__AUTH_MANAGER",
                       "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager")
    assert team_access_control("risk") is None
    monkeypatch.setenv("AIRFLOW__CORE__AUTH_MANAGER", AUTH_MANAGER)
    assert team_access_control("risk") is None
