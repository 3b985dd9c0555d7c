"""The model server's connection and input limits: declared once here, as command-line flags of
``python -m kiln.tasks.serving`` (``--max-body-bytes`` ...), enforced by :mod:`.protocol`.

Each bound answers a way one client could take the server from the others: a large body (memory, and the event
loop's time to parse it), a request sent slowly or never finished (a connection held without end), and many idle
connections (descriptors: past ``RLIMIT_NOFILE`` the server cannot accept even ``/health``).
"""

from __future__ import annotations

import argparse
import logging
import resource
from dataclasses import dataclass, field, fields

log = logging.getLogger(__name__)

#: Descriptors kept free of connections for what the server itself opens (bundle files, logs, the event loop's own
#: descriptors, torch's threads): the connection cap is at most the descriptor limit minus this.
FD_RESERVE = 64


@dataclass(frozen=True)
class ServerLimits:
    """How much one request or connection may take. Each field is the flag ``--<name with dashes>``."""

    max_body_bytes: int = field(default=8 * 1024 * 1024, metadata={"help": (
        "largest request body in bytes (default 8 MiB); a larger declared Content-Length gets 413 before the body "
        "is read, a chunked body gets 413 as soon as it passes the limit")})
    max_pending_body_bytes: int = field(default=256 * 1024 * 1024, metadata={"help": (
        "most body bytes of all requests in flight together, counted from their declared Content-Length (or as a "
        "chunked body arrives) until they are answered (default 256 MiB); past it a request with a body gets 503")})
    header_timeout_s: float = field(default=10.0, metadata={"help": (
        "seconds from a request's first byte until its headers must be complete (default 10); then 408")})
    body_timeout_s: float = field(default=30.0, metadata={"help": (
        "seconds from a request's headers until its body must be complete (default 30); then 408")})
    idle_timeout_s: float = field(default=5.0, metadata={"help": (
        "seconds a connection may wait for its next (or first) request before it is closed (default 5)")})
    max_connections: int = field(default=1000, metadata={"help": (
        f"most open connections (default 1000; at most the descriptor limit minus {FD_RESERVE}); past it the "
        "longest-idle connection is closed for the new one, else the request arriving the longest gets 408, and "
        "with neither the new one gets 503")})

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value > 0:  # `not >` also refuses NaN
                raise ValueError(f"--{_flag(f.name)} must be > 0, found {value!r}")

    def connection_cap(self, descriptors: int) -> int:
        """The connections allowed under a descriptor limit of ``descriptors`` (``RLIMIT_NOFILE`` soft).

        Raises:
            ValueError: the descriptor limit leaves no room for connections.
        """
        room = descriptors - FD_RESERVE
        if room < 1:
            raise ValueError(f"the descriptor limit (RLIMIT_NOFILE {descriptors}) leaves no room for connections; "
                             f"raise it above {FD_RESERVE} (ulimit -n)")
        return min(self.max_connections, room)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`ServerLimits` field, with its default and help."""
    group = parser.add_argument_group("limits")
    for f in fields(ServerLimits):
        group.add_argument(f"--{_flag(f.name)}", type=int if f.type in (int, "int") else float, default=f.default,
                           dest=f.name, metavar="N", help=f.metadata["help"])


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    """The :class:`ServerLimits` of parsed flags (see :func:`add_limit_arguments`).

    Raises:
        ValueError: a limit is not positive (the message names its flag).
    """
    return ServerLimits(**{f.name: getattr(args, f.name) for f in fields(ServerLimits)})


def raise_descriptor_limit() -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit (more connections before ``EMFILE``).

    Returns:
        The soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # e.g. macOS caps the soft limit below an unlimited hard one
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, target, exc)
    return soft
