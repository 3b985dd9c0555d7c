"""Model servers that come back: ``python -m kiln.tasks.services.watchdog watch`` (the ``model-servers`` component of
``kiln up``) and ``... start`` (what ``kiln up`` runs to start the servers that are not running).

Where the watching lives, and why: ``kiln up`` exits once the services are healthy (they outlive the command), so
nothing of it stays to watch. The watchdog is one more component of the set: started, recorded in ``service.json``,
restarted when dead and stopped by ``kiln down`` (before the model servers) like the others. It dies with its owner:
it exits as soon as that record no longer names it (``down`` removed it, or another ``up`` replaced it). The model
servers stay processes of their own sessions, so the watchdog dying or being restarted never interrupts one.

What counts as dead: a pid file (``<serving_dir>/<model>/server.pid``) naming a process that is gone, for
:data:`CONFIRM_S`. Stopping a server on purpose (``stop_server``: ``kiln serve stop``, a rollback to nothing) removes
the pid file, so a stopped server is never brought back. The stale pid file is removed at once (the record says
``restarting``), and the server restarted at once, then with exponential backoff; after
:attr:`RestartPolicy.max_restarts` restarts within :attr:`RestartPolicy.window_s` it is given up: reported
``dead`` until ``kiln up`` or a deploy starts it again. Each model's state
(running, restarting, dead, stopped; pid, port, restarts, last error) goes to a status file that ``kiln status``
reads.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from kiln.tasks.processes import alive
from kiln.tasks.settings import Settings, get_settings
from kiln.tasks.storage.artifacts import atomic_write_bytes

log = logging.getLogger(__name__)

#: How often the watchdog looks at the pid files.
POLL_S = 0.25
#: How long a pid file must name a process that is gone before the server counts as dead: ``stop_server`` removes
#: the pid file a moment after its process exits, and that moment must not look like a crash.
CONFIRM_S = 1.0
#: How long a new watchdog waits to be named in the service record before it concludes it has no owner.
ADOPTION_S = 120.0
#: The modules of a model's endpoint (a server, or its replicas' fleet), and its files (kiln.tasks.serving.process).
ENDPOINT_MODULES = frozenset({"kiln.tasks.serving", "kiln.tasks.fleet"})
PID_FILE = "server.pid"
DEPLOYMENT_FILE = "deployment.json"
LOCK_FILE = ".supervise.lock"
#: What ``kiln status`` says of a model server.
STATES = ("running", "restarting", "dead", "stopped")


@dataclass(frozen=True)
class RestartPolicy:
    """How often a dead model server is restarted: at once, then with exponential backoff, within a budget."""

    max_restarts: int = 5
    """Restarts allowed within :attr:`window_s`; one more death and the server is given up (``dead``)."""
    window_s: float = 300.0
    """The sliding window the restarts are counted in (seconds)."""
    backoff_s: float = 1.0
    """The wait before the second restart in the window; it doubles for each further one."""
    max_backoff_s: float = 30.0
    """The longest wait between two restarts."""

    def delay(self, recent: int) -> float | None:
        """Seconds to wait before the next restart after ``recent`` restarts in the window; ``None``: give up."""
        if recent >= self.max_restarts:
            return None
        return 0.0 if recent == 0 else min(self.max_backoff_s, self.backoff_s * 2 ** (recent - 1))


@dataclass
class ServerRecord:
    """What the watchdog knows of one model's server."""

    model: str
    state: str = "stopped"
    pid: int | None = None
    host: str | None = None
    port: int | None = None
    restarts: int = 0
    """Restarts the watchdog made (each attempt counts, successful or not)."""
    error: str | None = None
    """Why the last restart failed (the server's log tail), or why it was given up."""
    back_after_s: float | None = None
    """Seconds from the death being noticed to the restarted server answering, for the last restart."""
    recent: deque[float] = field(default_factory=deque)
    suspect: tuple[int, float] | None = None
    died_at: float = 0.0
    next_try: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The status-file form."""
        return {"state": self.state, "pid": self.pid, "host": self.host, "port": self.port,
                "restarts": self.restarts, "error": self.error, "back_after_s": self.back_after_s}


def read_pid(run_dir: Path) -> int | None:
    """The pid a model's pid file names (``None``: no file, or not a number)."""
    try:
        return int((run_dir / PID_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def is_server(pid: int) -> bool:
    """Whether ``pid`` is a live model-server process (not a zombie, not a reused pid of something else)."""
    try:
        return alive(pid) and not ENDPOINT_MODULES.isdisjoint(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def listen_address(pid: int) -> tuple[str, int] | None:
    """``(host, port)`` from a live server's command line (``None`` when it cannot be read)."""
    try:
        argv = psutil.Process(pid).cmdline()
        return argv[argv.index("--host") + 1], int(argv[argv.index("--port") + 1])
    except (psutil.Error, ValueError, IndexError):
        return None


def deployed_models(serving_dir: Path) -> list[str]:
    """The models that have a deployment file under ``serving_dir``."""
    return sorted(p.parent.name for p in Path(serving_dir).glob(f"*/{DEPLOYMENT_FILE}"))


@contextmanager
def model_lock(run_dir: Path) -> Iterator[None]:
    """Hold a model's start lock, so that the watchdog and ``kiln up`` never start the same server twice."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _endpoints() -> dict[str, Any]:
    """Each valid spec's endpoint (host, port, the setting that chose the port), by pipeline name."""
    from kiln.tasks.pipeline.endpoint import Endpoint
    from kiln.tasks.spec import load_specs

    return {spec.name: Endpoint.of(spec) for _path, spec in load_specs(get_settings().pipelines_dir)[0]}


def _ensure(settings: Settings, model: str, host: str, port: int, port_setting: str) -> int:
    """Start (or, when one answers there already, reload) the server of ``model``; return its pid (-1: unknown)."""
    from kiln.tasks.serving.auth import resolve_token
    from kiln.tasks.serving.process import ensure_server

    run_dir = settings.serving_dir / model
    handle = ensure_server(run_dir / DEPLOYMENT_FILE, host=host, port=port, token=resolve_token(settings),
                           run_dir=run_dir, port_setting=port_setting)
    return handle.pid


def start_missing(settings: Settings) -> dict[str, str]:
    """Start the server of every deployed pipeline that has none running; a running one is left alone (not
    restarted, not reloaded). Returns pipeline -> URL.

    Raises:
        ServingError: a server could not be started (its port is taken, it exited during start-up).
    """
    from kiln.tasks.serving.process import server_url

    urls = {}
    for model, endpoint in _endpoints().items():
        if not endpoint.deployment.is_file():
            continue
        with model_lock(endpoint.run_dir):
            pid = read_pid(endpoint.run_dir)
            if pid is not None and is_server(pid):
                log.info("model server of %r runs (pid %d): left alone", model, pid)
            else:
                _ensure(settings, model, endpoint.host, endpoint.port, endpoint.port_setting)
        urls[model] = server_url(endpoint.host, endpoint.port)
    return urls


class Watchdog:
    """Restarts the model servers that died (see the module's docstring).

    Args:
        settings: where the model servers live (``serving_dir``) and the token.
        status_file: where each model's state is written after every look.
        policy: how often a dead server is restarted.
    """

    def __init__(self, settings: Settings, status_file: Path, policy: RestartPolicy = RestartPolicy()) -> None:
        self.settings = settings
        self.status_file = status_file
        self.policy = policy
        self.records: dict[str, ServerRecord] = {}

    def check(self) -> None:
        """Look at every deployed model once; restart what died; write the status file."""
        _reap_children()
        models = set(deployed_models(self.settings.serving_dir))
        for model in sorted(models | set(self.records)):
            if model not in models:  # undeployed (a rollback to nothing): nothing to watch
                self.records.pop(model, None)
                continue
            self._check(self.records.setdefault(model, ServerRecord(model)))
        self.write_status()

    def _check(self, rec: ServerRecord) -> None:
        run_dir = self.settings.serving_dir / rec.model
        pid = read_pid(run_dir)
        if pid is not None and is_server(pid):
            if (rec.state, rec.pid) != ("running", pid):
                log.info("model server of %r runs (pid %d)", rec.model, pid)
            if rec.state == "dead":  # started again by kiln up or a deploy: a fresh budget
                rec.recent.clear()
                rec.error = None
            rec.state, rec.pid, rec.suspect = "running", pid, None
            rec.host, rec.port = listen_address(pid) or (rec.host, rec.port)
            return
        if rec.state == "dead" or (pid is None and rec.state != "restarting"):
            # Given up, or stopped on purpose (stop_server removes the pid file): only kiln up or a deploy starts it.
            rec.state, rec.pid = rec.state if rec.state == "dead" else "stopped", None
            return
        now = time.monotonic()
        if rec.state != "restarting":
            if pid is None or rec.suspect is None or rec.suspect[0] != pid:
                rec.suspect = (pid, now) if pid is not None else None
                return
            if now - rec.suspect[1] < CONFIRM_S:
                return
            rec.state, rec.died_at, rec.suspect = "restarting", rec.suspect[1], None
            _remove_stale_pid_file(run_dir)
            delay = self.policy.delay(self._recent(rec, now))
            rec.next_try = now + (delay or 0.0)
            log.warning("model server of %r (pid %d) died; %d restarts in the last %g s, next one in %s s",
                        rec.model, pid, len(rec.recent), self.policy.window_s, "-" if delay is None else f"{delay:g}")
        self._restart(rec, run_dir, now)

    def _recent(self, rec: ServerRecord, now: float) -> int:
        """How many restarts of ``rec`` fall in the policy's window up to ``now``."""
        while rec.recent and rec.recent[0] < now - self.policy.window_s:
            rec.recent.popleft()
        return len(rec.recent)

    def _restart(self, rec: ServerRecord, run_dir: Path, now: float) -> None:
        if self.policy.delay(self._recent(rec, now)) is None:
            rec.state, rec.pid = "dead", None
            rec.error = (f"gave up after {len(rec.recent)} restarts in {self.policy.window_s:g} s; start it again "
                         f"with kiln up" + (f". Last error: {rec.error}" if rec.error else ""))
            _remove_stale_pid_file(run_dir)
            log.error("model server of %r: %s", rec.model, rec.error)
            return
        if now < rec.next_try:
            return
        rec.recent.append(now)
        rec.restarts += 1
        self.write_status()
        host, port, setting = self._address(rec)
        try:
            with model_lock(run_dir):
                pid = read_pid(run_dir)
                if pid is None or not is_server(pid):  # else `kiln up` or a deploy was quicker
                    pid = _ensure(self.settings, rec.model, host, port, setting)
        except (RuntimeError, OSError, ValueError) as exc:  # ServingError, DeploymentError, a bad spec
            rec.error = str(exc)[-2000:]
            rec.next_try = time.monotonic() + (self.policy.delay(len(rec.recent)) or 0.0)
            log.warning("restart %d of the model server of %r failed (%d in the last %g s): %s", rec.restarts,
                        rec.model, len(rec.recent), self.policy.window_s, rec.error)
            return
        rec.state, rec.pid, rec.error = "running", pid, None
        rec.host, rec.port = host, port
        rec.back_after_s = round(time.monotonic() - rec.died_at, 2)
        log.info("restarted the model server of %r: pid %d, answering %.1f s after it died (restart %d; %d in the "
                 "last %g s)", rec.model, pid, rec.back_after_s, rec.restarts, len(rec.recent), self.policy.window_s)

    def _address(self, rec: ServerRecord) -> tuple[str, int, str]:
        """Where the server of ``rec`` listens: its spec's endpoint, else where it listened, else the default."""
        try:
            endpoint = _endpoints().get(rec.model)
        except (OSError, ValueError) as exc:
            log.warning("cannot read the pipeline specs (%s); restarting %r where it listened", exc, rec.model)
            endpoint = None
        if endpoint is not None:
            return endpoint.host, endpoint.port, endpoint.port_setting
        if rec.port is not None:
            return rec.host or self.settings.serve_host, rec.port, "KILN_SERVE_PORT"
        return self.settings.serve_host, self.settings.serve_port, "KILN_SERVE_PORT"

    def write_status(self) -> None:
        """Write every model's record to the status file (atomically)."""
        body = {"pid": os.getpid(), "servers": {m: r.to_dict() for m, r in sorted(self.records.items())}}
        atomic_write_bytes(self.status_file, json.dumps(body, indent=2).encode())


def _remove_stale_pid_file(run_dir: Path) -> None:
    """Remove the pid file if the process it names is gone: no pid file may claim that a dead server runs (while
    the watchdog restarts it, its record says so)."""
    with model_lock(run_dir):
        pid = read_pid(run_dir)
        if pid is not None and not is_server(pid):
            (run_dir / PID_FILE).unlink(missing_ok=True)


def _reap_children() -> None:
    """Reap the servers this process started that exited: a zombie child would look alive to the system."""
    with suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def describe(serving_dir: Path, status_file: Path, watching: bool) -> dict[str, dict[str, Any]]:
    """Each deployed model's server as ``kiln status`` shows it: state (one of :data:`STATES`), pid, port, url,
    restarts and the last error; from the pid files (alive or not, now) and the watchdog's status file.

    Args:
        watching: whether the watchdog runs (a server found dead is then ``restarting``, else ``dead``).
    """
    from kiln.tasks.serving.process import server_url

    try:
        recorded = json.loads(status_file.read_text())["servers"]
    except (FileNotFoundError, ValueError, KeyError):
        recorded = {}
    out = {}
    for model in deployed_models(serving_dir):
        rec = recorded.get(model) or {}
        pid = read_pid(serving_dir / model)
        address = listen_address(pid) if pid is not None and is_server(pid) else None
        if address is not None:
            state = "running"
        elif rec.get("state") == "dead":
            state = "dead"
        elif pid is not None or rec.get("state") == "restarting":
            state = "restarting" if watching else "dead"
        else:
            state = "stopped"
        host, port = address or (rec.get("host"), rec.get("port"))
        out[model] = {"state": state, "pid": pid if address else None, "port": port,
                      "url": server_url(host, port) if host and port else None,
                      "restarts": rec.get("restarts", 0), "error": rec.get("error"),
                      "back_after_s": rec.get("back_after_s")}
    return out


def _owned(owner: Path, name: str) -> bool | None:
    """Whether the service record names this process as component ``name`` (``None``: no record)."""
    try:
        return json.loads(owner.read_text())["pids"].get(name) == os.getpid()
    except (FileNotFoundError, ValueError, KeyError, AttributeError):
        return None


def watch(watchdog: Watchdog, owner: Path, name: str) -> int:
    """Check every :data:`POLL_S` until the service record ``owner`` stops naming this process."""
    started, adopted = time.monotonic(), False
    log.info("watching the model servers under %s (restarts: %s)", watchdog.settings.serving_dir, watchdog.policy)
    while True:
        owned = _owned(owner, name)
        adopted = adopted or bool(owned)
        if (adopted and not owned) or (not adopted and time.monotonic() - started > ADOPTION_S):
            log.info("%s no longer names this watchdog (pid %d): exiting", owner, os.getpid())
            return 0
        watchdog.check()
        time.sleep(POLL_S)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``watch --owner SERVICE_JSON --status FILE`` or ``start [--json]``."""
    parser = argparse.ArgumentParser(prog="python -m kiln.tasks.services.watchdog",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    w = sub.add_parser("watch", help="restart the model servers that die, until the service record drops this")
    w.add_argument("--owner", type=Path, required=True, help="the service record (service.json) naming this")
    w.add_argument("--name", default="model-servers", help="this component's name in the record")
    w.add_argument("--status", type=Path, required=True, help="where each model server's state is written")
    s = sub.add_parser("start", help="start every deployed pipeline's server that is not running")
    s.add_argument("--json", action="store_true", help="print {pipeline: url} as JSON")
    args = parser.parse_args(argv)
    os.umask(0o077)  # pid files, logs and anything a server writes: private
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = get_settings()
    if args.action == "watch":
        return watch(Watchdog(settings, args.status), args.owner, args.name)
    urls = start_missing(settings)
    print(json.dumps(urls, indent=2) if args.json else "\n".join(f"{m}: {u}" for m, u in urls.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
