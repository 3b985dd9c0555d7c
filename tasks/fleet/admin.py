"""The fleet's own HTTP paths, which answer for the whole replica set (HAProxy routes them here; see
:data:`kiln.tasks.fleet.haproxy.FLEET_PATHS`).

- ``POST /admin/reload``: a rolling reload. Every ready replica re-reads the deployment file, one after the other;
  each swaps its models in place while it serves, so no request fails. It answers like one server's reload (the
  ``/ready`` body); a replica that cannot load the new deployment stops the roll there (409, the replicas not yet
  reached keep the previous models, and so does the one that refused).
- ``GET /admin/stats``: the replicas' per-variant figures added up: requests and errors summed; p50 and p99 are
  the largest of the replicas' (an upper bound: the replicas' latency windows are not merged).
- ``GET /admin/fleet``: the replicas, their ports, pids, cores and states, the autoscaler's target and the recent
  events (:meth:`~kiln.tasks.fleet.fleet.Fleet.status`).

Each needs an ``admin`` token of the model, as on a single server (:class:`~kiln.tasks.serving.tokens.TokenCheck`).
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import httpx

from kiln.tasks.fleet.replicas import expected_version
from kiln.tasks.serving import tokens
from kiln.tasks.serving.deployment import DeploymentError, read_deployment

if TYPE_CHECKING:
    from kiln.tasks.fleet.fleet import Fleet

log = logging.getLogger(__name__)

#: How long one replica's reload may take (it loads and warms the new bundles).
RELOAD_TIMEOUT_S = 180.0
_reload_lock = threading.Lock()


def rolling_reload(fleet: Fleet, authorization: str) -> tuple[int, Any]:
    """Reload the ready replicas one at a time; ``(status, body)`` as one server's ``/admin/reload`` answers."""
    try:
        deployment = read_deployment(fleet.deployment_path)
    except DeploymentError as exc:
        return 409, {"detail": f"reload failed, the previous models keep serving: {exc}"}
    with _reload_lock:
        fleet.apply(deployment)  # replicas that become ready from now on are brought to it
        with fleet.lock:
            # A canary replica left without a canary (a rollback, a promotion) is being drained, not reloaded.
            ready = [r for r in sorted(fleet.replicas.values(), key=lambda r: (r.role != "champion", r.slot))
                     if r.state == "ready" and expected_version(deployment, r.role) is not None]
        bodies: dict[str, Any] = {}
        for done, replica in enumerate(ready):
            try:
                response = httpx.post(f"{replica.url}/admin/reload",
                                      headers={"Authorization": authorization}, timeout=RELOAD_TIMEOUT_S)
            except httpx.HTTPError as exc:
                # It died meanwhile: the fleet replaces it, and the replacement reads the new file.
                log.warning("reload of replica r%d failed (%s); it is replaced", replica.slot, exc)
                continue
            if response.status_code != 200:
                detail = _json_or_text(response)
                log.error("rolling reload stopped at replica r%d (%d of %d reloaded): %s", replica.slot, done,
                          len(ready), detail)
                return response.status_code, detail
            bodies[replica.role] = response.json()
            log.info("replica r%d (%s) reloaded (%d of %d)", replica.slot, replica.role, done + 1, len(ready))
    if "champion" not in bodies:
        return 503, {"detail": "no champion replica is ready to reload; the ones starting read the new deployment"}
    # One server's answer: the champion as its replicas serve it, the canary as the canary replica does, at the
    # deployment's share (the balancer's weights; the replica itself sends it everything).
    body = bodies["champion"]
    if deployment.canary is not None and bodies.get("canary", {}).get("canary"):
        body = {**body, "canary": {**bodies["canary"]["canary"], "share": deployment.canary.share}}
    return 200, body


def aggregate_stats(bodies: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One ``/admin/stats`` body from the replicas' (see the module docstring)."""
    if not bodies:
        return None
    out: dict[str, Any] = {"since": min(b.get("since") or 0 for b in bodies), "replicas": len(bodies)}
    for variant in ("champion", "canary"):
        parts = [b[variant] for b in bodies if b.get(variant)]
        if not parts:
            out[variant] = None
            continue
        latencies = {key: [p[key] for p in parts if p.get(key) is not None] for key in ("p50_ms", "p99_ms")}
        out[variant] = {"version": parts[0]["version"], "requests": sum(p["requests"] for p in parts),
                        "errors": sum(p["errors"] for p in parts),
                        **{key: max(values) if values else None for key, values in latencies.items()}}
    return out


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return {"detail": response.text[:500]}


def _stats(fleet: Fleet, authorization: str) -> tuple[int, Any]:
    with fleet.lock:
        urls = [r.url for r in fleet.replicas.values() if r.state == "ready"]
    bodies = []
    for url in urls:
        try:
            response = httpx.get(f"{url}/admin/stats", headers={"Authorization": authorization},
                                 timeout=10)
        except httpx.HTTPError:
            continue  # a replica that just died: the others' figures stand
        if response.status_code == 200:
            bodies.append(response.json())
    body = aggregate_stats(bodies)
    return (200, body) if body is not None else (503, {"detail": "no replica is ready"})


def serve_admin(fleet: Fleet) -> ThreadingHTTPServer:
    """Start the fleet's HTTP paths on a loopback port (a daemon thread); the server's ``server_address`` says
    which."""
    from kiln.tasks.serving.tokens import TOKENS_FILE
    from kiln.tasks.settings import get_settings

    check = tokens.TokenCheck(fleet.token, get_settings().serving_dir / TOKENS_FILE)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> str | None:
            """The caller's Authorization header if it holds an admin token of this model; else answered."""
            header = self.headers.get("Authorization") or ""
            check.refresh()
            grant = check.grant([(b"authorization", header.encode())])
            if grant is None:
                self._answer(401, {"detail": "a bearer token is required"})
                return None
            reason = None if grant is tokens.KILN_GRANT else grant.refusal("admin", fleet.deployment.model)
            if reason is not None:
                self._answer(403, {"detail": reason})
                return None
            return header

        def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(min(length, 65536))
            if self.path != "/admin/reload":
                self._answer(405, {"detail": f"{self.path} does not take POST"})
            elif (auth := self._authorized()) is not None:
                self._answer(*rolling_reload(fleet, auth))

        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            if self.path not in ("/admin/stats", "/admin/fleet"):
                self._answer(404, {"detail": f"{self.path} is not a fleet path"})
            elif (auth := self._authorized()) is not None:
                self._answer(*_stats(fleet, auth)) if self.path == "/admin/stats" else self._answer(200, fleet.status())

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            log.debug(format, *args)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="fleet-admin", daemon=True).start()
    return server
