"""HAProxy in front of a model's replicas: its configuration, its process and its runtime API.

The balancer is Debian's ``haproxy`` package (``make haproxy``), one process per served model, started by the
model's fleet (:mod:`.fleet`) and dying with it. Its configuration names server slots ``r1..rN`` (``N`` =
``replicas.max`` + 1, for a canary), all in maintenance at first; the fleet fills a slot at run time through the
admin socket (``set server ... addr``, ``state ready|drain|maint``) and adds slots when ``replicas.max`` is raised
(``add server``), so scaling, replacing a dead replica, rolling a new version and a larger set never reload
HAProxy or drop a connection.

What HAProxy does by itself, from the configuration:

- health checks: ``GET /ready`` every :data:`CHECK_INTERVAL_MS` (a loading or dead replica leaves the rotation);
- a connection refused or reset by a replica marks it down at once (``observe layer4``), and the request is
  retried on another replica (``retry-on`` + ``option redispatch``): a predict request is idempotent;
- weighted round-robin balancing (``roundrobin``, whose weights change at run time): a request goes to the set of
  replicas in the proportion of their weights whatever the load, so a canary gets its share even from one client
  sending a request at a time (``leastconn`` looks at the weights only to break ties between busy servers: a
  quiet endpoint split its requests evenly between a champion and a 25 % canary); a slow or dying replica is left
  by the health check and ``observe layer4`` instead;
- ``/admin/reload``, ``/admin/stats`` and ``/admin/fleet`` go to the fleet (one answer for the whole set, not for
  the replica a request happened to reach); every other path to a replica.
"""

from __future__ import annotations

import csv
import io
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

#: Health-check interval of each replica, in milliseconds (a dead replica is out of rotation within it).
CHECK_INTERVAL_MS = 500
#: The backend of the replicas, and the prefix of its server slots.
BACKEND = "replicas"
SLOT_PREFIX = "r"
#: The paths the fleet answers for the whole replica set.
FLEET_PATHS = ("/admin/reload", "/admin/stats", "/admin/fleet")
#: How long a runtime-API command may take.
SOCKET_TIMEOUT_S = 5.0


class HAProxyError(RuntimeError):
    """HAProxy is missing, or its admin socket refused or failed a command."""


def haproxy_binary() -> str:
    """The ``haproxy`` executable.

    Raises:
        HAProxyError: it is not installed; the message says how to install it.
    """
    found = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")
                                             if Path(p).is_file()), None)
    if found is None:
        raise HAProxyError("haproxy is not installed: replicas are served behind it; run `make haproxy` (Debian's "
                           "haproxy package) or drop `replicas` from the deployment to serve one process")
    return found


def slot_name(slot: int) -> str:
    """The server name of slot ``slot`` (1-based)."""
    return f"{SLOT_PREFIX}{slot}"


def empty_slot(server: str, check_interval_ms: int = CHECK_INTERVAL_MS) -> str:
    """``server`` and its words, in maintenance and pointing nowhere until the fleet fills it: the same in the
    configuration's ``server`` lines and in the runtime API's ``add server`` (which takes no ``default-server``)."""
    ms = check_interval_ms
    return (f"{server} 127.0.0.1:1 disabled check inter {ms} fastinter {ms} downinter {ms} "
            "rise 1 fall 2 observe layer4 error-limit 1 on-error mark-down")


def render_config(*, host: str, port: int, slots: int, admin_port: int, socket_path: Path,
                  check_interval_ms: int = CHECK_INTERVAL_MS, max_conn: int = 4096) -> str:
    """The configuration of one model's balancer.

    Args:
        host: the address clients connect to (the pipeline's endpoint, ``KILN_SERVE_HOST``).
        port: its port.
        slots: server slots, one per replica the set may grow to.
        admin_port: the fleet's own HTTP port on loopback (the :data:`FLEET_PATHS`).
        socket_path: the admin socket.
        check_interval_ms: health-check interval.
        max_conn: the most client connections at once.
    """
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    servers = "\n".join(f"    server {empty_slot(slot_name(i), check_interval_ms)}" for i in range(1, slots + 1))
    fleet_paths = " ".join(FLEET_PATHS)
    return f"""# Written by kiln (kiln.tasks.fleet.haproxy); rewritten on every start.
global
    maxconn {max_conn}
    # A port already taken makes the start fail, instead of two balancers sharing it.
    noreuseport
    stats socket {socket_path} mode 600 level admin
    stats timeout 10s

defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout queue 30s
    timeout http-keep-alive 60s
    option redispatch
    retries 3
    retry-on conn-failure empty-response junk-response response-timeout

frontend endpoint
    bind {bind}
    maxconn {max_conn}
    use_backend fleet if {{ path {fleet_paths} }}
    default_backend {BACKEND}

backend {BACKEND}
    balance roundrobin
    option httpchk GET /ready
    http-check expect status 200
{servers}

backend fleet
    server fleet 127.0.0.1:{admin_port}
"""


@dataclass(frozen=True)
class SlotStat:
    """One server slot as HAProxy sees it."""

    name: str
    status: str
    """``UP``, ``DOWN``, ``MAINT``, ``DRAIN``, ``no check`` ..."""
    in_flight: int
    """Requests being served by this replica now (``scur``)."""
    queued: int
    """Requests waiting for it (``qcur``)."""
    total: int
    """Requests sent to it since it was filled (``stot``)."""


class RuntimeAPI:
    """Commands to a running HAProxy over its admin socket (one connection per command).

    Args:
        socket_path: the ``stats socket`` of the configuration.
    """

    def __init__(self, socket_path: Path):
        self.socket_path = Path(socket_path)

    def command(self, line: str) -> str:
        """Send one command and return HAProxy's answer.

        Raises:
            HAProxyError: the socket cannot be reached, or the answer is an error.
        """
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(SOCKET_TIMEOUT_S)
                sock.connect(str(self.socket_path))
                sock.sendall(line.encode() + b"\n")
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
        except OSError as exc:
            raise HAProxyError(f"HAProxy's admin socket {self.socket_path} failed on {line!r}: {exc}") from exc
        answer = b"".join(chunks).decode(errors="replace")
        # A `set` answers nothing or a line of what changed; a refusal says why in words like these.
        first = answer.strip().split("\n", 1)[0].lower()
        if not line.startswith("show ") and any(word in first for word in (
                "unknown", "no such", "require", "invalid", "error", "not found", "permission denied")):
            raise HAProxyError(f"HAProxy refused {line!r}: {answer.strip()}")
        return answer

    def add_slot(self, slot: int) -> None:
        """A new empty slot ``slot`` in the backend, at run time (``add server``: no reload, no dropped connection),
        its health checks on as in the configuration's slots."""
        name = f"{BACKEND}/{slot_name(slot)}"
        answer = self.command(f"add server {empty_slot(name)}")
        if "New server registered" not in answer:
            raise HAProxyError(f"HAProxy did not add {name}: {answer.strip()}")
        self.command(f"enable health {name}")

    def fill(self, slot: int, address: str, port: int) -> None:
        """Point ``slot`` at a replica on ``address:port`` and put it in rotation (health checks decide)."""
        name = f"{BACKEND}/{slot_name(slot)}"
        self.command(f"set server {name} addr {address} port {port}")
        self.command(f"set server {name} state ready")

    def drain(self, slot: int) -> None:
        """No new requests to ``slot``; those in flight finish."""
        self.command(f"set server {BACKEND}/{slot_name(slot)} state drain")

    def empty(self, slot: int) -> None:
        """Take ``slot`` out of rotation at once (maintenance)."""
        self.command(f"set server {BACKEND}/{slot_name(slot)} state maint")

    def set_weight(self, slot: int, weight: int) -> None:
        """``slot``'s weight (0..256), relative to the other slots'."""
        self.command(f"set weight {BACKEND}/{slot_name(slot)} {weight}")

    def stats(self) -> dict[str, SlotStat]:
        """Each slot's state, in-flight and queued requests; the key ``BACKEND`` is the backend's own line
        (its ``queued`` counts requests no replica has taken yet)."""
        text = self.command("show stat")
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines or not lines[0].startswith("# "):
            raise HAProxyError(f"HAProxy's `show stat` answered {text[:200]!r}")
        rows = csv.DictReader(io.StringIO("\n".join([lines[0][2:], *lines[1:]])))
        out = {}
        for row in rows:
            if row.get("pxname") != BACKEND:
                continue
            name = row["svname"] if row["svname"] != "BACKEND" else BACKEND
            out[name] = SlotStat(name=name, status=row.get("status", ""), in_flight=int(row.get("scur") or 0),
                                 queued=int(row.get("qcur") or 0), total=int(row.get("stot") or 0))
        return out
