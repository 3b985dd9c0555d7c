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
* a connection cap: past it, the longest-idle connection is closed to make room (an idle keep-alive connection
  may be closed at any time in HTTP/1.1), and with none idle the new connection gets 503.

A refused request's connection is closed gracefully: the response is written, the write side shut, and what the
client still sends is read and dropped (never kept) for at most :data:`LINGER_S`, so that the client reads the
response instead of a reset.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from kiln.tasks.serving.limits import ServerLimits

log = logging.getLogger(__name__)

#: Seconds a refused connection keeps reading (and dropping) what its client still sends before it is closed.
LINGER_S = 2.0


def limited_protocol(limits: ServerLimits, connection_cap: int) -> type[HttpToolsProtocol]:
    """The protocol class to give uvicorn (``uvicorn.run(..., http=limited_protocol(...))``).

    Args:
        limits: the body size and time limits.
        connection_cap: most open connections (:meth:`ServerLimits.connection_cap` of the descriptor limit).
    """
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,),
                {"limits": limits, "connection_cap": connection_cap, "idle": {}})


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """One connection; see the module docstring. Use :func:`limited_protocol` to get a configured subclass."""

    limits: ServerLimits
    connection_cap: int
    #: The connections with no request in progress, the longest idle first (a dict keeps insertion order).
    idle: dict[LimitedHttpToolsProtocol, None]

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.idle_timeout_s
        self._deadline: asyncio.TimerHandle | None = None
        self._open_requests = 0  # begun and not yet answered (more than one only when pipelined)
        self._body_bytes = 0
        self._refused = False

    # Connection life

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.connection_cap:
            oldest = next((c for c in self.idle if c is not self), None)
            if oldest is None:
                log.warning("refused a connection: all %d connections are busy (--max-connections)",
                            self.connection_cap)
                self._refuse(503, f"the server has {self.connection_cap} connections open, all busy; retry later")
                return
            oldest._drop_idle()
        self._become_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.idle.pop(self, None)
        self._cancel_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: read and dropped
        super().data_received(data)
        if self._open_requests == 0 and self.timeout_keep_alive_task is None and not self.transport.is_closing():
            # Bytes that began no request (blank lines between requests): the connection is still idle.
            self._arm_idle_timer()

    def on_response_complete(self) -> None:
        self._open_requests = max(0, self._open_requests - 1)
        super().on_response_complete()
        if self._open_requests == 0 and not self.transport.is_closing():
            self.idle[self] = None

    # Parser callbacks

    def on_message_begin(self) -> None:
        if self._refused:
            return
        self.idle.pop(self, None)
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
        self._arm_deadline(self.limits.body_timeout_s, "body", "--body-timeout-s")
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        self._body_bytes += len(body)
        if self._body_bytes > self.limits.max_body_bytes:
            self._refuse(413, _too_large(self.limits.max_body_bytes, f"more than {self.limits.max_body_bytes} "
                                                                     "bytes of a chunked body"), during_body=True)
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._cancel_deadline()
        super().on_message_complete()

    # Limits

    def _become_idle(self) -> None:
        self.idle[self] = None
        self._arm_idle_timer()

    def _arm_idle_timer(self) -> None:
        self._unset_keepalive_if_required()
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def _drop_idle(self) -> None:
        self.idle.pop(self, None)
        if not self.transport.is_closing():
            self.transport.close()

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
        self._cancel_deadline()
        self._unset_keepalive_if_required()
        self.idle.pop(self, None)
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
        self.flow.resume_reading()  # keep reading to drop what the client still sends
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


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
