"""uvicorn's httptools protocol with the limits of :class:`~kiln.tasks.serving.limits.ServerLimits` enforced where
the bytes arrive, before the app sees a request.

What uvicorn lacks, and why it is added here rather than in the app: uvicorn has no time limit on reading a
request's headers or body, and none on a connection that never sends its first request (its keep-alive timeout
starts only after a response); its ``limit_concurrency`` answers 503 to requests but still accepts and keeps every
connection; and it buffers a body for the app without a size limit. An app only sees a request once its headers are
complete, so neither a half-sent header nor an idle connection ever reaches it.

Per connection this adds:

* an idle timer from the moment it opens (uvicorn's keep-alive timer, armed early): closed, without a response;
* a header deadline from a request's first byte, and a body deadline from its headers: 408, then closed;
* the body size limit: a declared ``Content-Length`` over it gets 413 before any of the body is read; a chunked
  body gets 413 once the bytes received pass it (the app then sees a disconnect and its answer is dropped);
* a budget of body bytes for all requests in flight together (declared, or received when chunked, until the
  request is answered), so that many bodies at once cannot take the memory one body limit allows each: 503;
* a connection cap: past it, the longest-idle connection is closed to make room (an idle keep-alive connection
  may be closed at any time in HTTP/1.1), else the one waiting longest for its headers gets 408, and with neither
  the new connection gets 503. So a crowd of idle or slow connections never keeps ``/health`` out.

A refused request's connection is closed gracefully: the response is written, the write side shut and reading
stopped (the rest of the body is never read), and the socket closed :data:`LINGER_S` later, so that the client
reads the response before the close resets the connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from kiln.tasks.serving.limits import ServerLimits

#: Seconds between a refusal and the close of its connection: the client's chance to read the answer before the
#: close resets the connection (closing a socket with unread data sends a reset, which may discard the answer).
LINGER_S = 1.0


def limited_protocol(limits: ServerLimits, connection_cap: int,
                     on_refused: Callable[[str], None] = lambda reason: None) -> type[HttpToolsProtocol]:
    """The protocol class to give uvicorn (``uvicorn.run(..., http=limited_protocol(...))``).

    Args:
        limits: the body size and time limits.
        connection_cap: most open connections (:meth:`ServerLimits.connection_cap` of the descriptor limit).
        on_refused: called with ``"408"``, ``"413"``, ``"503"`` or ``"evicted"`` for each connection a limit ends
            (for a metric: under attack there are too many for the log).
    """
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,),
                {"limits": limits, "connection_cap": connection_cap, "on_refused": staticmethod(on_refused),
                 "idle": {}, "arriving": {}, "pending": _Budget(limits.max_pending_body_bytes)})


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """One connection; see the module docstring. Use :func:`limited_protocol` to get a configured subclass."""

    limits: ServerLimits
    connection_cap: int
    on_refused: Callable[[str], None]
    #: The connections with no request in progress, the longest idle first (a dict keeps insertion order).
    idle: dict[LimitedHttpToolsProtocol, None]
    #: The connections whose request (headers or body) is still arriving, the longest waiting first.
    arriving: dict[LimitedHttpToolsProtocol, None]
    #: The body bytes of all requests in flight (``max_pending_body_bytes``).
    pending: _Budget

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.idle_timeout_s
        self._deadline: asyncio.TimerHandle | None = None
        self._open_requests = 0  # begun and not yet answered (more than one only when pipelined)
        self._body_bytes = 0
        self._reserved = 0  # this connection's share of ``pending``
        self._headers_done = False
        self._refused = False

    # Connection life

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.connection_cap and not self._make_room():
            self._refuse(503, f"the server has {self.connection_cap} connections open (--max-connections), all "
                              "busy; retry later")
            return
        self._become_idle()

    def _make_room(self) -> bool:
        """Close one connection for a new one: the longest idle, else the one whose request has been arriving the
        longest (a client on a working network sends a request within milliseconds; one still sending is slow or
        hostile). Requests the app is working on are never ended. Whether one was closed."""
        victim = next(iter(self.idle), None)
        if victim is not None:
            victim.idle.pop(victim, None)
            victim.transport.close()
            self.on_refused("evicted")
            return True
        victim = next(iter(self.arriving), None)
        if victim is not None:
            victim._refuse(408, "the request was still arriving when the server needed its connection for another "
                                f"(--max-connections {self.connection_cap})", during_body=victim._headers_done)
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        self.idle.pop(self, None)
        self.arriving.pop(self, None)
        self._cancel_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # already refused: the rest of the request is dropped
        super().data_received(data)
        if self._open_requests == 0 and self.timeout_keep_alive_task is None and not self.transport.is_closing():
            # Bytes that began no request (blank lines between requests): the connection is still idle.
            self._arm_idle_timer()

    def on_response_complete(self) -> None:
        self._release()
        self._open_requests = max(0, self._open_requests - 1)
        super().on_response_complete()
        if self._open_requests == 0 and not self.transport.is_closing():
            self.idle[self] = None

    # Parser callbacks

    def on_message_begin(self) -> None:
        if self._refused:
            return
        self.idle.pop(self, None)
        self.arriving[self] = None
        self._headers_done = False
        self._open_requests += 1
        self._body_bytes = 0
        self._arm_deadline(self.limits.header_timeout_s, "headers", "--header-timeout-s")
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._cancel_deadline()
        declared = _content_length(self.headers)
        if declared is not None and declared > self.limits.max_body_bytes:
            self._refuse(413, _too_large(self.limits.max_body_bytes, f"Content-Length {declared}"))
            return
        if declared and not self._reserve(declared):
            return
        self._arm_deadline(self.limits.body_timeout_s, "body", "--body-timeout-s")
        super().on_headers_complete()
        self._headers_done = True  # the request's cycle (self.cycle) exists: a refusal from now on is during_body

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        self._body_bytes += len(body)
        if self._body_bytes > self.limits.max_body_bytes:
            self._refuse(413, _too_large(self.limits.max_body_bytes, f"more than {self.limits.max_body_bytes} "
                                                                     "bytes of a chunked body"), during_body=True)
            return
        if self._body_bytes > self._reserved and not self._reserve(self._body_bytes - self._reserved):
            return  # a chunked body (or one longer than declared) over the budget
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self.arriving.pop(self, None)
        self._cancel_deadline()
        super().on_message_complete()

    # Limits

    def _reserve(self, size: int) -> bool:
        """Count ``size`` more body bytes against ``pending``; refuse with 503 (and ``False``) when over it."""
        if self.pending.used + size > self.pending.limit:
            self._refuse(503, f"the server holds {self.pending.used} bytes of request bodies in flight, near its "
                              f"limit of {self.pending.limit} (--max-pending-body-bytes); retry later",
                         during_body=self._headers_done)
            return False
        self.pending.used += size
        self._reserved += size
        return True

    def _release(self) -> None:
        self.pending.used -= self._reserved
        self._reserved = 0

    def _become_idle(self) -> None:
        self.idle[self] = None
        self._arm_idle_timer()

    def _arm_idle_timer(self) -> None:
        self._unset_keepalive_if_required()
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def _arm_deadline(self, seconds: float, part: str, flag: str) -> None:
        self._cancel_deadline()
        self._deadline = self.loop.call_later(seconds, self._deadline_passed, seconds, part, flag)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self, seconds: float, part: str, flag: str) -> None:
        self._deadline = None
        self._refuse(408, f"the request {part} did not arrive within {seconds:g} s ({flag})",
                     during_body=part == "body")

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # after a refusal the parser may still meet the rest of the dropped body
            super().send_400_response(msg)

    def _refuse(self, status: int, detail: str, *, during_body: bool = False) -> None:
        """Answer ``status`` in the app's place, then close gracefully (see the module docstring).

        Args:
            during_body: the request's headers went to the app already (its cycle is ``self.cycle``).
        """
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        self._release()
        self.on_refused(str(status))
        self._cancel_deadline()
        self._unset_keepalive_if_required()
        self.idle.pop(self, None)
        self.arriving.pop(self, None)
        if during_body:
            if self.cycle.response_started:
                # The app answered before the body was complete (e.g. 401): no second answer, only a close.
                self.transport.close()
                return
            # The app sees a disconnect, and whatever it sends from now on is dropped.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        body = orjson.dumps({"detail": detail})
        head = [STATUS_LINE[status]]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)]
        self.transport.write(b"".join(head) + body)
        # Read no more: what the client still sends waits in the kernel's buffers, costing no memory and no time
        # here, until the close resets the connection.
        self.flow.pause_reading()
        if len(self.connections) > self.connection_cap:
            self.transport.close()  # no descriptor to spare for a graceful close
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


class _Budget:
    """Body bytes in flight on all connections of one server, and their limit."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the parser refuses it itself
    return None


def _too_large(limit: int, found: str) -> str:
    return (f"the request body may hold at most {limit} bytes ({limit / 1048576:g} MiB, --max-body-bytes), "
            f"found {found}; send fewer records per request")
