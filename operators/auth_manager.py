"""The Airflow auth manager of kiln's ``prod`` profile: Airflow's FAB auth manager, with failed token requests
throttled as its login form is, and the command that applies kiln's roles and users (``kiln up`` runs it).

FAB limits POSTs to its login form (``[fab] auth_rate_limit`` per client address, Flask-Limiter) but not
``POST /auth/token``, where scripts and attackers log in: 40 wrong passwords there were all answered 401. Here the
same limit counts the failed token requests of each client address; past it, the address gets 429 with
``Retry-After`` before any password is checked, until the window frees a slot. Successful logins are not counted, so
automation that takes many tokens is never throttled.

``python -m kiln.operators.auth_manager`` reads a plan (``kiln.tasks.services.auth.auth_plan``) on its standard
input: it syncs FAB's own roles, creates the team roles, and creates or updates the users with their roles and
passwords.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import time
import weakref
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from airflow.configuration import conf
from airflow.providers.fab.auth_manager.fab_auth_manager import FabAuthManager
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.responses import JSONResponse

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]
#: The auth manager's token endpoints (mounted under ``/auth``).
TOKEN_PATHS = ("/token", "/token/cli")


class FailedLoginThrottle:
    """ASGI middleware: a client address with ``limit`` failed (401) token requests in the window gets 429.

    The token requests of one address run one at a time, so a burst sent at once is counted as it goes: it gets no
    more tries than the same requests sent one after another. Counts live in this process (one api-server worker
    by default); each worker of a multi-worker api-server keeps its own, so the limit is per worker there.
    """

    def __init__(self, app: ASGIApp, limit: str) -> None:
        self.app = app
        self.limit = parse(limit)
        self.limiter = MovingWindowRateLimiter(MemoryStorage())
        # An address's lock lives while one of its requests holds or awaits it.
        self._turns: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith(TOKEN_PATHS):
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("unknown", 0))[0]
        turn = self._turns.get(client)
        if turn is None:
            turn = self._turns[client] = asyncio.Lock()
        async with turn:
            await self._login(client, scope, receive, send)

    async def _login(self, client: str, scope: Scope, receive: Callable[[], Awaitable[Message]],
                     send: Callable[[Message], Awaitable[None]]) -> None:
        if not self.limiter.test(self.limit, client):
            retry = max(1, math.ceil(self.limiter.get_window_stats(self.limit, client).reset_time - time.time()))
            log.warning("login throttled for %s: %s failed logins, retry in %d s", client, self.limit, retry)
            response = JSONResponse({"detail": f"too many failed logins from {client} ({self.limit}); "
                                               f"retry in {retry} s"}, status_code=429,
                                    headers={"Retry-After": str(retry)})
            await response(scope, receive, send)
            return

        async def count_failure(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 401:
                self.limiter.hit(self.limit, client)
            await send(message)

        await self.app(scope, receive, count_failure)


class KilnFabAuthManager(FabAuthManager):
    """Airflow's FAB auth manager, with failed token requests throttled by ``[fab] auth_rate_limit``."""

    def get_fastapi_app(self) -> Any:
        app = super().get_fastapi_app()
        if app is not None and conf.getboolean("fab", "auth_rate_limited"):
            app.add_middleware(FailedLoginThrottle, limit=conf.get("fab", "auth_rate_limit"))
        return app


def team_permissions() -> list[tuple[str, str]]:
    """A team role's own permissions: FAB's ``User`` role without its access to every DAG, so that the DAGs (and
    their runs, task instances, logs) it reaches are those whose ``access_control`` grants it; and without creating
    Asset events, which would start other teams' pipelines that an Asset feeds."""
    from airflow.providers.fab.auth_manager.security_manager.override import FabAirflowSecurityManagerOverride as Sm
    from airflow.providers.fab.www.security import permissions as p

    every_dag = p.RESOURCE_DAG
    return ([perm for perm in Sm.VIEWER_PERMISSIONS if perm != (p.ACTION_CAN_READ, every_dag)]
            + [perm for perm in Sm.USER_PERMISSIONS if perm[1] not in (every_dag, p.RESOURCE_ASSET)])


def apply_plan(plan: dict[str, Any]) -> None:
    """Sync FAB's roles, create the team roles with :func:`team_permissions`, and create or update each user."""
    from airflow.providers.fab.auth_manager.cli_commands.utils import get_application_builder

    with get_application_builder() as appbuilder:
        appbuilder.add_permissions(update_perms=True)
        sm = appbuilder.sm
        sm.sync_roles()
        perms = team_permissions()
        sm.bulk_sync_roles([{"role": role, "perms": perms} for role in plan["team_roles"]])
        _drop_other_permissions(sm, plan["team_roles"], set(perms))
        for user in plan["users"]:
            name, role = user["username"], sm.find_role(user["role"])
            if role is None:
                raise SystemExit(f"role {user['role']!r} of user {name!r} does not exist")
            existing = sm.find_user(username=name)
            if existing is None:
                if not sm.add_user(username=name, first_name=name, last_name="kiln", email=f"{name}@kiln.invalid",
                                   role=[role], password=user["password"]):
                    raise SystemExit(f"creating the Airflow user {name!r} failed (see the log above)")
                log.info("created user %s (%s)", name, role.name)
                continue
            if [r.name for r in existing.roles] != [role.name]:
                existing.roles = [role]
                sm.update_user(existing)
                log.info("user %s now has role %s", name, role.name)
            if not sm.check_password(name, user["password"]):
                sm.reset_password(existing.id, user["password"])
                log.info("password of user %s reset to the one in the secrets folder", name)


def _drop_other_permissions(sm: Any, roles: list[str], wanted: set[tuple[str, str]]) -> None:
    """Take from kiln's team roles what :func:`team_permissions` no longer grants (FAB only ever adds), keeping the
    per-DAG permissions that the DAGs' ``access_control`` grants them."""
    from airflow.providers.fab.www.security import permissions as p

    for name in roles:
        role = sm.find_role(name)
        for perm in list(role.permissions):
            resource = perm.resource.name
            if (perm.action.name, resource) not in wanted and not resource.startswith(tuple(p.PREFIX_LIST)):
                sm.remove_permission_from_role(role, perm)
                log.info("role %s no longer has %s on %s", name, perm.action.name, resource)


def main() -> int:
    """``python -m kiln.operators.auth_manager`` with a plan as JSON on standard input."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    apply_plan(json.load(sys.stdin))
    return 0


if __name__ == "__main__":
    sys.exit(main())
