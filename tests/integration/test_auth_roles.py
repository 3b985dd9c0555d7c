"""Every door locked, with roles: the production auth manager (Airflow's FAB auth manager, as kiln configures it)
in front of a real api-server started by ``kiln up``.

Two pipelines of two teams (``alpha``, ``beta``). ``kiln up`` creates the users (passwords generated into
``$KILN_HOME/secrets/passwords.json``, 0600): ``admin``, ``viewer`` and one operator per team. The team operator
sees and triggers only their team's pipeline; the viewer sees both and triggers neither; the admin does everything;
40 wrong passwords are throttled. The services run on the embedded profile (SQLite, LocalExecutor: fast) with the
prod profile's auth manager named explicitly; that the prod profile names it by default is a unit test
(``tests/unit/test_auth_plan.py``). DAGs stay paused, so a trigger queues a run that never executes.
"""

from __future__ import annotations

import json
import re
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml
from kiln_service import EXAMPLE_SPECS, Platform, get_token, running_service

pytestmark = pytest.mark.integration

KILN_FAB = "kiln.operators.auth_manager.KilnFabAuthManager"
TEAMS = {"alpha": "penguins_alpha", "beta": "penguins_beta"}


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    tmp = tmp_path_factory.mktemp("auth")
    spec = yaml.safe_load((EXAMPLE_SPECS / "penguins_species.yaml").read_text())
    (tmp / "specs").mkdir()
    files = []
    for team, name in TEAMS.items():
        files.append(tmp / "specs" / f"{name}.yaml")
        files[-1].write_text(yaml.safe_dump({**spec, "name": name, "team": team}, sort_keys=False))
    env = {"AIRFLOW__CORE__AUTH_MANAGER": KILN_FAB, "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True"}
    with running_service(tmp, specs=files, extra_env=env) as platform:
        yield platform


@pytest.fixture(scope="module")
def passwords(platform: Platform) -> dict[str, str]:
    path = platform.home / "secrets" / "passwords.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def clients(platform: Platform, passwords: dict[str, str]) -> Iterator[dict[str, httpx.Client]]:
    """One REST client per user, each with its own token (taken before the brute-force test throttles loopback)."""
    users = ["admin", "viewer", "operator-alpha", "operator-beta"]
    assert set(users) <= set(passwords), sorted(passwords)
    made = {u: httpx.Client(base_url=platform.url, timeout=30,
                            headers={"Authorization": f"Bearer {get_token(platform.url, u, passwords[u])}"})
            for u in users}
    _wait_for_dags(made["admin"], set(TEAMS.values()))
    yield made
    for client in made.values():
        client.close()


def _wait_for_dags(admin: httpx.Client, dag_ids: set[str], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not dag_ids <= (seen := {d["dag_id"] for d in admin.get("/api/v2/dags").json()["dags"]}):
        assert time.monotonic() < deadline, f"DAGs {sorted(dag_ids - seen)} not parsed after {timeout:.0f} s"
        time.sleep(0.5)


def _trigger(client: httpx.Client, dag_id: str) -> httpx.Response:
    return client.post(f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": {"epochs": 1}})


def _pool(name: str) -> dict:
    return {"name": name, "slots": 1, "description": "auth test", "include_deferred": False}


def _visible(client: httpx.Client) -> set[str]:
    response = client.get("/api/v2/dags")
    assert response.status_code == 200, response.text
    return {d["dag_id"] for d in response.json()["dags"]}


@pytest.mark.parametrize(("team", "other"), [("alpha", "beta"), ("beta", "alpha")])
def test_a_team_operator_sees_and_triggers_only_their_teams_pipeline(clients: dict[str, httpx.Client],
                                                                     team: str, other: str) -> None:
    operator = clients[f"operator-{team}"]
    # The example spec is monitored: the team sees its pipeline, that pipeline's monitor and scoring DAGs, nothing
    # else.
    assert _visible(operator) == {TEAMS[team], f"{TEAMS[team]}_monitor", f"{TEAMS[team]}_score"}
    assert operator.get(f"/api/v2/dags/{TEAMS[other]}_score").status_code == 403
    assert operator.get(f"/api/v2/dags/{TEAMS[other]}_monitor").status_code == 403
    assert _trigger(operator, TEAMS[team]).status_code == 200
    assert operator.get(f"/api/v2/dags/{TEAMS[team]}/dagRuns").json()["total_entries"] >= 1
    assert _trigger(operator, TEAMS[other]).status_code == 403
    assert operator.get(f"/api/v2/dags/{TEAMS[other]}").status_code == 403
    assert operator.get(f"/api/v2/dags/{TEAMS[other]}/dagRuns").status_code == 403
    # An Asset event would start every pipeline the Asset feeds, other teams' too.
    assert operator.post("/api/v2/assets/events", json={"asset_id": 1}).status_code == 403


def test_the_viewer_sees_every_pipeline_and_triggers_none(clients: dict[str, httpx.Client]) -> None:
    viewer = clients["viewer"]
    assert set(TEAMS.values()) <= _visible(viewer)
    for dag_id in TEAMS.values():
        assert _trigger(viewer, dag_id).status_code == 403
        assert viewer.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False}).status_code == 403
    assert viewer.post("/api/v2/pools", json=_pool("viewer_pool")).status_code == 403


def test_the_admin_can_do_everything(clients: dict[str, httpx.Client]) -> None:
    admin = clients["admin"]
    assert set(TEAMS.values()) <= _visible(admin)
    for dag_id in TEAMS.values():
        assert _trigger(admin, dag_id).status_code == 200
    assert admin.post("/api/v2/pools", json=_pool("admin_pool")).status_code == 201
    assert admin.patch(f"/api/v2/dags/{TEAMS['alpha']}", json={"is_paused": True}).status_code == 200
    users = admin.get("/auth/fab/v1/users")
    assert users.status_code == 200, users.text
    assert {"admin", "viewer", "operator-alpha", "operator-beta"} <= {u["username"] for u in users.json()["users"]}


def test_the_login_form_is_throttled(platform: Platform) -> None:
    """FAB's own limit on its login form (``[fab] auth_rate_limit`` per address): the 6th POST in 40 s gets 429."""
    with httpx.Client(base_url=platform.url, timeout=30) as browser:
        page = browser.get("/auth/login/")
        csrf = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page.text)
        assert page.status_code == 200 and csrf, page.text[:300]
        codes = [browser.post("/auth/login/", data={"csrf_token": csrf.group(1), "username": "admin",
                                                    "password": "wrong"}).status_code for _ in range(10)]
    assert 429 not in codes[:5] and set(codes[5:]) == {429}, codes


def test_forty_wrong_passwords_are_throttled(platform: Platform, clients: dict[str, httpx.Client],
                                            passwords: dict[str, str]) -> None:
    """Runs last in this module: it throttles loopback, where every client of this test comes from. The 40
    attempts are sent 8 at a time: a burst gets no more tries than a sequence."""
    started = time.monotonic()

    def attempt(_: int) -> int:
        with httpx.Client(base_url=platform.url, timeout=60) as anonymous:
            return anonymous.post("/auth/token", json={"username": "admin", "password": "wrong"}).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(attempt, range(40)))
    elapsed = time.monotonic() - started
    with httpx.Client(base_url=platform.url, timeout=30) as anonymous:
        throttled = anonymous.post("/auth/token", json={"username": "admin", "password": passwords["admin"]})
    assert set(codes) == {401, 429} and codes.count(401) == 5, codes
    # While throttled, even the right password is refused: guessing cannot go on at the same pace.
    assert throttled.status_code == 429 and 0 < int(throttled.headers["Retry-After"]) <= 40, throttled.text
    assert elapsed < 30, f"40 attempts took {elapsed:.1f} s"
    # Tokens issued before still work: throttling refuses logins, not the API.
    assert clients["admin"].get("/api/v2/dags").status_code == 200
