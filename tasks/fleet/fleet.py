"""A model served by replicas behind HAProxy: the fleet process (``python -m kiln.tasks.fleet``, :mod:`.__main__`).

The fleet is the process :func:`kiln.tasks.serving.process.ensure_server` starts for a deployment with
``replicas``; it takes the endpoint's place (the same pid file, address and token) and owns, dying with it:

- **the balancer**: HAProxy on ``host:port`` (:mod:`.haproxy`), the one address of the model, with a slot per
  replica the set may grow to and one more for a canary;
- **the replicas** (:mod:`.replicas`): kiln model servers on loopback ports, each pinned to the cores it leased
  from the resource pool ``replicas.pool`` (the pools show serving beside training); a replica that dies is
  taken out of rotation by HAProxy at once and replaced;
- **the canary**: while the deployment has one, a replica of its own whose weight at the balancer is the canary's
  share; a rollback drains it, a promotion rolls the champion replicas onto its version and drains it;
- **the autoscaler** (:class:`~kiln.tasks.serving.scaling.Autoscaler`): every second it reads the requests in
  flight at the balancer and adds a champion replica, or drains one (no new requests, the ones in flight finish)
  and stops it;
- **the admin paths** (:mod:`.admin`): ``/admin/reload`` reloads the replicas one at a time (a rolling update:
  each swaps its models in place, so no request fails), ``/admin/stats`` adds the replicas' figures up,
  ``/admin/fleet`` says what runs.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from kiln.tasks.fleet.containers import ContainerEngines
from kiln.tasks.fleet.haproxy import HAProxyError, RuntimeAPI, haproxy_binary, render_config
from kiln.tasks.fleet.replicas import Replica, Role, expected_version, start_replica, weights, write_role_files
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
#: Files in the endpoint's run folder.
HAPROXY_CONFIG = "haproxy.cfg"
HAPROXY_LOG = "haproxy.log"
ADMIN_SOCKET = "haproxy.sock"


class Fleet:
    """The replicas of one model behind its balancer (see the module docstring).

    Args:
        deployment_path: the deployment file of the model.
        host, port: the balancer's address (the model's endpoint).
        run_dir: where the balancer's files, the replicas' deployment files and their logs go.
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
        write_role_files(self.run_dir, self.deployment)
        self.settings = self.deployment.replicas or ReplicaSettings()
        self.slots = self.settings.max + 1  # one more for a canary
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
        self.served = False
        """Whether a replica was ever in rotation (before that, a deployment that cannot load ends the fleet)."""
        self.fatal: str | None = None
        self._backoff: dict[int, tuple[float, float]] = {}  # slot -> (next try, delay)
        self._weights: dict[int, int] = {}  # slot -> the weight HAProxy has
        self._next_scale = 0.0
        self._waiting = False
        self.engines = ContainerEngines(self.settings.image, f"serve-{_slug(self.deployment.model)}-{os.getpid()}") \
            if self.settings.image else None

    def start_balancer(self, admin_port: int) -> None:
        """Write the configuration and start HAProxy on the endpoint's address, every slot empty."""
        config, sock = self.run_dir / HAPROXY_CONFIG, self.run_dir / ADMIN_SOCKET
        sock.unlink(missing_ok=True)
        config.write_text(render_config(host=self.host, port=self.port, slots=self.slots, admin_port=admin_port,
                                        socket_path=sock))
        self.balancer = start_process([haproxy_binary(), "-db", "-f", str(config)], cwd=self.run_dir,
                                      output=self.run_dir / HAPROXY_LOG, die_with_parent=True)
        deadline = time.monotonic() + 10
        while not sock.exists():
            if self.balancer.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"HAProxy did not start on {self.host}:{self.port}: "
                                   f"{tail(self.run_dir / HAPROXY_LOG)}")
            time.sleep(0.05)
        log.info("balancer (HAProxy pid %d) on %s:%d, %d slot(s)", self.balancer.pid, self.host, self.port,
                 self.slots)

    # Replicas ---------------------------------------------------------------------------------------------

    def _start_replica(self, role: Role, now: float) -> None:
        """Lease cores and start a replica of ``role`` in a free slot (the pool full: tried again in a second)."""
        slot = next((s for s in range(1, self.slots + 1)
                     if s not in self.replicas and self._backoff.get(s, (0.0, 0.0))[0] <= now), None)
        if slot is None:
            return
        lease = self.leases.acquire(slot)
        if lease is None:
            self._backoff[slot] = (now + 1.0, 0.5)
            if not self._waiting:  # logged once per wait
                log.warning("replica r%d waits for %d core(s) of pool %s", slot, self.settings.cpus,
                            self.settings.pool)
            self._waiting = True
            return
        self._waiting = False
        try:
            proc, address, port, offset = start_replica(
                slot, role, lease, run_dir=self.run_dir, token=self.token, threads=self.settings.cpus,
                extra_args=self.replica_args, engines=self.engines, bundles=self._bundle_folders())
        except Exception:
            self.leases.release(lease)
            raise
        self.replicas[slot] = Replica(slot, role, address, port, proc, lease, since=now,
                                      deadline=now + REPLICA_START_TIMEOUT_S, log_offset=offset)

    def _bundle_folders(self) -> tuple[Path, ...]:
        """The folders a container replica mounts: those holding the served bundles (kiln fetches every version of
        a model into one, so a reload onto a new version finds it there)."""
        refs = [self.deployment.champion, *([self.deployment.canary] if self.deployment.canary else [])]
        return tuple(sorted({Path(ref.bundle).resolve().parent for ref in refs}))

    def _stop_replica(self, replica: Replica, grace_s: float = 10) -> None:
        """Stop ``replica``'s process, empty its slot and give its cores back."""
        self.api.empty(replica.slot)
        self._weights.pop(replica.slot, None)
        replica.proc.stop(grace_s=grace_s, what=f"replica r{replica.slot} (pid {replica.proc.pid})")
        self.leases.release(replica.lease)
        self.replicas.pop(replica.slot, None)

    def _check_ready(self, replica: Replica, now: float) -> None:
        """Put a starting replica in rotation once it serves its set's version."""
        try:
            response = httpx.get(f"{replica.url}/ready", timeout=0.5)
        except httpx.HTTPError:
            response = None
        if response is not None and response.status_code == 200:
            body = response.json()
            served = body.get(replica.role) or {}
            if str(served.get("version")) != expected_version(self.deployment, replica.role):
                # Started before the deployment changed: bring it to the current one first.
                httpx.post(f"{replica.url}/admin/reload",
                           headers={"Authorization": f"Bearer {self.token}"}, timeout=REPLICA_START_TIMEOUT_S)
                return
            self.api.fill(replica.slot, replica.address, replica.port)
            replica.state, self.served = "ready", True
            self._backoff.pop(replica.slot, None)
            self._event("ready", replica, f"in rotation after {now - replica.since:.1f} s")
        elif now > replica.deadline:
            self._event("start-timeout", replica, f"not ready within {REPLICA_START_TIMEOUT_S:g} s")
            self._stop_replica(replica)

    def _on_exit(self, replica: Replica, code: int, now: float) -> None:
        """A replica died: out of rotation, cores back, and its slot refilled (after a back-off when it never
        became ready: a deployment that cannot load must not be restarted in a tight loop)."""
        self.api.empty(replica.slot)
        self._weights.pop(replica.slot, None)
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
        """One pass: deaths, readiness, finished drains, scaling, slots to fill or empty, and the weights."""
        with self.lock:
            if self.balancer is not None and (code := self.balancer.poll()) is not None:
                # Without its balancer the endpoint is unreachable: end, so that the watchdog starts it anew.
                self.fatal = f"HAProxy exited with code {code}: {tail(self.run_dir / HAPROXY_LOG, lines=5)}"
                return
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
            self._converge("champion", self.desired, now)
            self._converge("canary", 1 if self.deployment.canary is not None else 0, now)
            self._weigh()

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

    def _converge(self, role: Role, wanted: int, now: float) -> None:
        """Start replicas of ``role`` up to ``wanted``, or drain the youngest beyond it."""
        serving = [r for r in self.replicas.values() if r.role == role and r.state != "draining"]
        if len(serving) < wanted:
            self._start_replica(role, now)
        elif len(serving) > wanted:
            youngest = max(serving, key=lambda r: (r.state == "starting", r.since))
            if youngest.state == "starting":
                self._event("cancelled", youngest, "no longer wanted")
                self._stop_replica(youngest, grace_s=2)
            else:
                self.api.drain(youngest.slot)
                youngest.state, youngest.deadline = "draining", now + self.settings.drain_timeout_s
                self._weights.pop(youngest.slot, None)
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

    def _weigh(self) -> None:
        """Give each ready replica its set's weight: the canary set gets the canary's share of the requests."""
        ready = [r for r in self.replicas.values() if r.state == "ready"]
        share = self.deployment.canary.share if self.deployment.canary is not None else 0.0
        per_role = dict(zip(("champion", "canary"), weights(
            share, sum(r.role == "champion" for r in ready), sum(r.role == "canary" for r in ready)), strict=True))
        for replica in ready:
            if self._weights.get(replica.slot) != per_role[replica.role]:
                self.api.set_weight(replica.slot, per_role[replica.role])
                self._weights[replica.slot] = per_role[replica.role]

    def _event(self, event: str, replica: Replica, detail: str) -> None:
        log.log(logging.WARNING if event in ("died", "start-timeout") else logging.INFO, "replica r%d (%s, pid %d): "
                "%s: %s", replica.slot, replica.role, replica.proc.pid, event, detail)
        self.events.append({"at": time.time(), "event": event, "slot": replica.slot, "role": replica.role,
                            "pid": replica.proc.pid, "detail": detail})
        del self.events[:-100]

    def apply(self, deployment: Deployment) -> None:
        """Take a reloaded deployment: the sets' files, the replica settings (a raised ``max`` adds slots to the
        balancer), and at once the canary's weight (a rollback drains the canary now, not at the next pass)."""
        with self.lock:
            write_role_files(self.run_dir, deployment)
            self.deployment = deployment
            settings = deployment.replicas or ReplicaSettings()
            if settings.max + 1 > self.slots:
                settings = self._add_slots(settings)
            self.settings, self.autoscaler = settings, Autoscaler(settings)
            self.desired = max(settings.min, min(settings.max, self.desired))
            self._converge("canary", 1 if deployment.canary is not None else 0, time.monotonic())
            self._weigh()

    def _add_slots(self, settings: ReplicaSettings) -> ReplicaSettings:
        """Slots up to ``settings.max`` + 1 at the balancer; where HAProxy refuses, the settings within the slots
        it has (logged: the model served anew gets them all)."""
        try:
            for slot in range(self.slots + 1, settings.max + 2):
                self.api.add_slot(slot)
                self.slots = slot
        except HAProxyError as exc:
            log.warning("replicas.max grew from %d to %d, but the balancer has %d slot(s) (%s); serve the model "
                        "anew for the rest (kiln serve stop, then deploy)", self.settings.max, settings.max,
                        self.slots, exc)
            most = self.slots - 1
            return ReplicaSettings(**{**settings.to_dict(), "max": most, "min": min(settings.min, most)})
        log.info("replicas.max grew from %d to %d: the balancer has %d slot(s)", self.settings.max, settings.max,
                 self.slots)
        return settings

    def status(self) -> dict[str, Any]:
        """What runs: the body of ``GET /admin/fleet``."""
        with self.lock:
            canary = self.deployment.canary
            return {"model": self.deployment.model, "champion": self.deployment.champion.version,
                    "canary": {"version": canary.version, "share": canary.share} if canary else None,
                    "desired": self.desired, "settings": self.settings.to_dict(), "in_flight": self.in_flight,
                    "restarts": self.restarts, "balancer_pid": self.balancer.pid if self.balancer else None,
                    "replicas": [{**r.to_dict(), "weight": self._weights.get(r.slot)}
                                 for r in sorted(self.replicas.values(), key=lambda r: r.slot)],
                    "events": self.events[-30:]}

    def run(self) -> None:
        """Tick until :meth:`shutdown` is asked for or the deployment proved unservable."""
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
        if self.engines is not None:
            self.engines.close()


def _slug(name: str) -> str:
    """``name`` as a container name part (``[a-zA-Z0-9_.-]``)."""
    return re.sub(r"[^a-zA-Z0-9_.-]+", "-", name).strip("-.") or "model"
