"""A model served by replicas behind HAProxy: ``python -m kiln.tasks.fleet --deployment F --host H
--port P``.

The fleet is the process :func:`kiln.tasks.serving.process.ensure_server` starts for a deployment with
``replicas``; it takes the endpoint's place (the same pid file, address and token) and owns, dying with it:

- **the balancer**: HAProxy on ``host:port`` (:mod:`.haproxy`), the one address of the model;
- **the replicas**: kiln model servers (``python -m kiln.tasks.serving``) on loopback ports, each pinned to the
  cores it leased from the resource pool ``replicas.pool`` (the pools show serving beside training); a replica
  that dies is taken out of rotation by HAProxy's health check at once and replaced;
- **the autoscaler** (:class:`~.scaling.Autoscaler`): every second it reads the requests in flight at the
  balancer and adds a replica, or drains one (no new requests, the ones in flight finish) and stops it;
- **the admin paths** (:mod:`.admin`): ``/admin/reload`` reloads the replicas one at a time (a rolling
  update: each swaps its models in place, so no request fails), ``/admin/stats`` adds the replicas' figures up,
  ``/admin/fleet`` says what runs.

SIGTERM stops it all: the balancer first (no new requests), then the replicas (those in flight finish), then the
leases are released. SIGHUP reloads like ``/admin/reload``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from kiln.tasks.fleet.haproxy import RuntimeAPI, haproxy_binary, render_config
from kiln.tasks.pools.allocation import Allocation
from kiln.tasks.processes import ProcessGroup, start_process, tail
from kiln.tasks.serving.__main__ import EXIT_BAD_DEPLOYMENT
from kiln.tasks.serving.deployment import Deployment, read_deployment
from kiln.tasks.serving.scaling import Autoscaler, ReplicaSettings

log = logging.getLogger(__name__)

#: One tick of the fleet's loop (replica deaths, readiness, drains).
TICK_S = 0.2
#: How often the autoscaler reads the balancer.
SCALE_EVERY_S = 1.0
#: The longest a replica may take to load its models before it is stopped and started again.
REPLICA_START_TIMEOUT_S = 120.0
#: Seconds between two attempts to start a replica that failed to start (doubling up to the second figure).
RESTART_BACKOFF_S = (1.0, 30.0)
#: The lease of a replica's cores expires unless heartbeated within this.
LEASE_TTL_S = 30.0
#: Files in the endpoint's run folder.
HAPROXY_CONFIG = "haproxy.cfg"
HAPROXY_LOG = "haproxy.log"
ADMIN_SOCKET = "haproxy.sock"


def free_port() -> int:
    """A port free on loopback now (the replica binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Replica:
    """One model-server process of the set."""

    slot: int
    port: int
    proc: ProcessGroup
    lease: Allocation
    """The lease of its cores."""
    state: str = "starting"
    """``starting`` (loading its models), ``ready`` (in rotation) or ``draining`` (leaving it)."""
    since: float = 0.0
    deadline: float = 0.0
    """When a start or a drain is given up."""
    log_offset: int = 0
    """Where this process's output starts in its slot's log file."""

    def to_dict(self) -> dict[str, Any]:
        return {"slot": self.slot, "port": self.port, "pid": self.proc.pid, "state": self.state,
                "cpus": list(self.lease.master.cpus), "lease": self.lease.lease_id}


class Fleet:
    """The replicas of one model behind its balancer (see the module docstring).

    Args:
        deployment_path: the deployment file every replica serves.
        host, port: the balancer's address (the model's endpoint).
        run_dir: where the balancer's files and the replicas' logs go.
        token: the kiln token (the replicas get it in their environment).
        leases: the replicas' cores (:class:`~kiln.tasks.fleet.leases.ReplicaLeases`).
        replica_args: extra flags of every replica's ``python -m kiln.tasks.serving``.
    """

    def __init__(self, deployment_path: Path, *, host: str, port: int, run_dir: Path, token: str, leases: Any,
                 replica_args: list[str] | None = None):
        self.deployment_path = Path(deployment_path)
        self.host, self.port, self.run_dir, self.token = host, port, Path(run_dir), token
        self.leases = leases
        self.replica_args = list(replica_args or [])
        self.deployment = read_deployment(self.deployment_path)
        self.settings = self.deployment.replicas or ReplicaSettings()
        self.autoscaler = Autoscaler(self.settings)
        self.desired = self.settings.min
        self.replicas: dict[int, Replica] = {}
        self.lock = threading.RLock()
        self.api = RuntimeAPI(self.run_dir / ADMIN_SOCKET)
        self.events: list[dict[str, Any]] = []
        self.restarts = 0
        self.in_flight = 0
        self.balancer: ProcessGroup | None = None
        self.stopping = threading.Event()
        self._backoff: dict[int, tuple[float, float]] = {}  # slot -> (next try, delay)
        self._next_scale = 0.0
        self._waiting = False
        self.served = False
        """Whether a replica was ever in rotation (before that, a deployment that cannot load ends the fleet)."""
        self.fatal: str | None = None

    # The balancer -----------------------------------------------------------------------------------------

    def start_balancer(self, admin_port: int) -> None:
        """Write the configuration and start HAProxy on the endpoint's address, every slot empty."""
        config = self.run_dir / HAPROXY_CONFIG
        sock = self.run_dir / ADMIN_SOCKET
        sock.unlink(missing_ok=True)
        config.write_text(render_config(host=self.host, port=self.port, slots=self.settings.max,
                                        admin_port=admin_port, socket_path=sock))
        self.balancer = start_process([haproxy_binary(), "-db", "-f", str(config)], cwd=self.run_dir,
                                      output=self.run_dir / HAPROXY_LOG, die_with_parent=True)
        deadline = time.monotonic() + 10
        while not sock.exists():
            if self.balancer.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"HAProxy did not start on {self.host}:{self.port}: "
                                   f"{tail(self.run_dir / HAPROXY_LOG)}")
            time.sleep(0.05)
        log.info("balancer (HAProxy pid %d) on %s:%d, %d slot(s)", self.balancer.pid, self.host, self.port,
                 self.settings.max)

    # Replicas ---------------------------------------------------------------------------------------------

    def _free_slot(self) -> int | None:
        return next((s for s in range(1, self.settings.max + 1) if s not in self.replicas), None)

    def _start_replica(self, slot: int, now: float) -> bool:
        """Lease cores and start a replica in ``slot``; ``False`` when the pool has no room now."""
        lease = self.leases.acquire(slot)
        if lease is None:
            # Tried again in a second; logged once per wait.
            self._backoff[slot] = (now + 1.0, 0.5)
            if not self._waiting:
                log.warning("replica r%d waits for %d core(s) of pool %s", slot, self.settings.cpus,
                            self.settings.pool)
            self._waiting = True
            return False
        self._waiting = False
        port = free_port()
        log_file = self.run_dir / f"replica-r{slot}.log"
        offset = log_file.stat().st_size if log_file.exists() else 0
        cmd = [sys.executable, "-m", "kiln.tasks.serving", "--deployment", str(self.deployment_path),
               "--host", "127.0.0.1", "--port", str(port), "--threads", str(self.settings.cpus), *self.replica_args]
        from kiln.tasks.serving.process import server_environment

        env = {**server_environment(os.environ), "KILN_SERVE_TOKEN": self.token, "PYTHONUNBUFFERED": "1"}
        cpus = lease.master.cpus
        try:
            proc = start_process(cmd, cwd=self.run_dir, env=env, output=log_file, cpus=cpus, die_with_parent=True)
        except OSError:
            self.leases.release(lease)
            raise
        self.replicas[slot] = Replica(slot, port, proc, lease, since=now, deadline=now + REPLICA_START_TIMEOUT_S,
                                      log_offset=offset)
        log.info("replica r%d starting (pid %d, port %d, cores %s)", slot, proc.pid, port, list(cpus) or "any")
        return True

    def _stop_replica(self, replica: Replica, grace_s: float = 10) -> None:
        """Stop ``replica``'s process, empty its slot and give its cores back."""
        self.api.empty(replica.slot)
        replica.proc.stop(grace_s=grace_s, what=f"replica r{replica.slot} (pid {replica.proc.pid})")
        self.leases.release(replica.lease)
        self.replicas.pop(replica.slot, None)

    def _check_ready(self, replica: Replica, now: float) -> None:
        """Put a starting replica in rotation once it serves the deployment's champion."""
        try:
            response = httpx.get(f"http://127.0.0.1:{replica.port}/ready", timeout=0.5)
        except httpx.HTTPError:
            response = None
        if response is not None and response.status_code == 200:
            version = str(response.json()["champion"]["version"])
            if version != str(self.deployment.champion.version):
                # Started before the deployment file changed: bring it to the current one first.
                self._post(replica, "/admin/reload", self.token)
                return
            self.api.fill(replica.slot, replica.port)
            replica.state, self.served = "ready", True
            self._backoff.pop(replica.slot, None)
            self._event("ready", replica, f"in rotation after {now - replica.since:.1f} s")
        elif now > replica.deadline:
            self._event("start-timeout", replica, f"not ready within {REPLICA_START_TIMEOUT_S:g} s")
            self._stop_replica(replica)

    def _post(self, replica: Replica, path: str, token: str) -> httpx.Response:
        return httpx.post(f"http://127.0.0.1:{replica.port}{path}", headers={"Authorization": f"Bearer {token}"},
                          timeout=REPLICA_START_TIMEOUT_S)

    def _on_exit(self, replica: Replica, code: int, now: float) -> None:
        """A replica died: out of rotation, cores back, and its slot refilled (after a back-off when it never
        became ready: a deployment that cannot load must not be restarted in a tight loop)."""
        self.api.empty(replica.slot)
        self.leases.release(replica.lease)
        self.replicas.pop(replica.slot, None)
        self.restarts += 1
        detail = f"exited with code {code}"
        if replica.state == "starting":
            output = tail(self.run_dir / f"replica-r{replica.slot}.log", lines=5, offset=replica.log_offset)
            if code == EXIT_BAD_DEPLOYMENT and not self.served:
                # Nothing was ever served: the deployment cannot load, and the starter must hear it now.
                self.fatal = f"replica r{replica.slot} cannot serve the deployment: {output.strip()}"
            _, delay = self._backoff.get(replica.slot, (0.0, RESTART_BACKOFF_S[0] / 2))
            delay = min(delay * 2, RESTART_BACKOFF_S[1])
            self._backoff[replica.slot] = (now + delay, delay)
            detail += f" while starting; next try in {delay:g} s; its last output: " + output.replace("\n", " | ")
        self._event("died", replica, detail)

    # The loop ---------------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """One pass: deaths, readiness, finished drains, scaling, and slots to fill or empty."""
        with self.lock:
            for replica in list(self.replicas.values()):
                code = replica.proc.poll()
                if code is not None and replica.state != "draining":
                    self._on_exit(replica, code, now)
                elif replica.state == "starting":
                    self._check_ready(replica, now)
            if now >= self._next_scale:
                self._next_scale = now + SCALE_EVERY_S
                self._scale(now)
            self._finish_drains(now)
            self._converge(now)

    def _scale(self, now: float) -> None:
        stats = self.api.stats()
        self.in_flight = sum(s.in_flight + s.queued for s in stats.values())
        desired = self.autoscaler.decide(now, self.in_flight, self.desired)
        if desired != self.desired:
            log.info("autoscaler: %d -> %d replica(s) (%d request(s) in flight, target %g per replica)",
                     self.desired, desired, self.in_flight, self.settings.target_in_flight)
            self.events.append({"at": time.time(), "event": "scale", "from": self.desired, "to": desired,
                                "in_flight": self.in_flight})
            self.desired = desired

    def _converge(self, now: float) -> None:
        """Start replicas up to ``desired``, or drain the youngest beyond it."""
        serving = [r for r in self.replicas.values() if r.state != "draining"]
        if len(serving) < self.desired:
            slot = self._free_slot()
            if slot is not None and self._backoff.get(slot, (0.0, 0.0))[0] <= now:
                self._start_replica(slot, now)
        elif len(serving) > self.desired:
            youngest = max(serving, key=lambda r: (r.state == "starting", r.since))
            if youngest.state == "starting":
                self._event("cancelled", youngest, "no longer wanted")
                self._stop_replica(youngest, grace_s=2)
            else:
                self.api.drain(youngest.slot)
                youngest.state, youngest.deadline = "draining", now + self.settings.drain_timeout_s
                self._event("draining", youngest, "out of rotation; its requests in flight finish")

    def _finish_drains(self, now: float) -> None:
        draining = [r for r in self.replicas.values() if r.state == "draining"]
        if not draining:
            return
        stats = self.api.stats()
        for replica in draining:
            slot = stats.get(f"r{replica.slot}")
            busy = slot.in_flight + slot.queued if slot is not None else 0
            if busy == 0 or now > replica.deadline or replica.proc.poll() is not None:
                self._stop_replica(replica)
                self._event("stopped", replica, "drained" if busy == 0 else f"drain timed out with {busy} in flight")

    def _event(self, event: str, replica: Replica, detail: str) -> None:
        log.log(logging.WARNING if event in ("died", "start-timeout") else logging.INFO, "replica r%d (pid %d): %s: %s",
                replica.slot, replica.proc.pid, event, detail)
        self.events.append({"at": time.time(), "event": event, "slot": replica.slot, "pid": replica.proc.pid,
                            "detail": detail})
        del self.events[:-100]

    def apply(self, deployment: Deployment) -> None:
        """Take a reloaded deployment's champion and replica settings (slots beyond the first ``max`` stay)."""
        with self.lock:
            self.deployment = deployment
            settings = deployment.replicas or ReplicaSettings()
            if settings.max > self.settings.max:
                log.warning("replicas.max grew from %d to %d: the balancer has %d slot(s) until the model is "
                            "served anew (kiln serve stop, then deploy)", self.settings.max, settings.max,
                            self.settings.max)
                settings = ReplicaSettings(**{**settings.to_dict(), "max": self.settings.max,
                                              "min": min(settings.min, self.settings.max)})
            self.settings = settings
            self.autoscaler = Autoscaler(settings)
            self.desired = max(settings.min, min(settings.max, self.desired))

    def status(self) -> dict[str, Any]:
        """What runs: the body of ``GET /admin/fleet``."""
        with self.lock:
            return {"model": self.deployment.model, "champion": self.deployment.champion.version,
                    "desired": self.desired, "settings": self.settings.to_dict(), "in_flight": self.in_flight,
                    "restarts": self.restarts, "balancer_pid": self.balancer.pid if self.balancer else None,
                    "replicas": [r.to_dict() for r in sorted(self.replicas.values(), key=lambda r: r.slot)],
                    "events": self.events[-30:]}

    def run(self) -> None:
        """Tick until :meth:`shutdown` is asked for."""
        while not self.stopping.is_set() and self.fatal is None:
            try:
                self.tick(time.monotonic())
            except Exception:  # noqa: BLE001 - one failed pass (the admin socket busy) must not end the endpoint
                log.exception("fleet pass failed; retrying")
            self.stopping.wait(TICK_S)

    def shutdown(self) -> None:
        """The balancer first (no new requests), then the replicas (their requests in flight finish)."""
        self.stopping.set()
        with self.lock:
            if self.balancer is not None:
                self.balancer.stop(grace_s=5, what=f"HAProxy pid {self.balancer.pid}")
            for replica in list(self.replicas.values()):
                replica.proc.stop(grace_s=10, what=f"replica r{replica.slot} (pid {replica.proc.pid})")
                self.leases.release(replica.lease)
            self.replicas.clear()
        self.leases.close()


def main(argv: list[str] | None = None) -> int:
    """Run the fleet until SIGTERM; exit 2 when it cannot start (the message names why)."""
    from kiln.tasks.fleet.admin import serve_admin
    from kiln.tasks.fleet.leases import ReplicaLeases
    from kiln.tasks.serving.auth import resolve_token
    from kiln.tasks.settings import get_settings

    parser = argparse.ArgumentParser(prog="python -m kiln.tasks.fleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deployment", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--run-dir", default=".", help="where the balancer's files and the replicas' logs go "
                        "(default: the working folder; kiln starts the fleet in the model's serving folder)")
    args, replica_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per readiness poll otherwise
    try:
        settings = get_settings()
        deployment = read_deployment(args.deployment)
        fleet = Fleet(Path(args.deployment), host=args.host, port=args.port, run_dir=Path(args.run_dir).resolve(),
                      token=resolve_token(settings), leases=ReplicaLeases.open(deployment),
                      replica_args=replica_args)
        admin = serve_admin(fleet)
        fleet.start_balancer(admin.server_address[1])
    except Exception as exc:  # noqa: BLE001 - the starter reads the reason from the log and the exit code
        print(f"python -m kiln.tasks.fleet: cannot serve {args.deployment}: {exc}", file=sys.stderr)
        return EXIT_BAD_DEPLOYMENT
    signal.signal(signal.SIGTERM, lambda *_: fleet.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: fleet.stopping.set())
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=fleet_reload_quietly, args=(fleet,),
                                                            daemon=True).start())
    log.info("watching the replicas of %s (min %d, max %d)", deployment.model, fleet.settings.min, fleet.settings.max)
    try:
        fleet.run()
    finally:
        admin.shutdown()
        fleet.shutdown()
    if fleet.fatal is not None:
        print(f"python -m kiln.tasks.fleet: {fleet.fatal}", file=sys.stderr)
        return EXIT_BAD_DEPLOYMENT
    return 0


def fleet_reload_quietly(fleet: Fleet) -> None:
    """SIGHUP: a rolling reload with the kiln token, its outcome logged (a signal has no caller to answer)."""
    from kiln.tasks.fleet.admin import rolling_reload

    status, body = rolling_reload(fleet, f"Bearer {fleet.token}")
    log.log(logging.INFO if status == 200 else logging.ERROR, "SIGHUP reload: %d %s", status, body)


if __name__ == "__main__":
    sys.exit(main())
