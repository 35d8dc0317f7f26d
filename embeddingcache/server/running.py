"""Running an app: the listening socket, uvicorn over it, and the limits on connections.

uvicorn closes a connection that stays idle after a response (``timeout_keep_alive``), but a
connection that never sends a whole request is never closed, and nothing bounds how many are
open: 1,100 silent sockets used up a server's 1,024 descriptors, and real requests failed
(issue 31). `Connections` holds the limits and `guarded` adds them to uvicorn's HTTP protocol:

- a connection that has not sent a request's complete headers ``header_timeout_s`` after it
  opened, or after its last answer, is closed (with a 408 if it had sent part of them);
- an idle connection after an answer is closed after ``keep_alive_s`` (uvicorn's own timer);
- beyond ``max_connections`` open ones, a new connection is answered 503 and closed at once,
  so that descriptors stay for the database and the model.

The body's own timeout is `protocol.Limits.body_timeout_s`, a 408 from the app.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
from dataclasses import replace
from typing import Any

from ..protocol import Connections
from .observe import RequestIdFilter

__all__ = ["bind", "config", "fit_descriptors", "guarded", "serve"]

logger = logging.getLogger("embeddingcache.server")

# Descriptors kept for what is not a connection: the databases, the model's files, logs.
RESERVED_DESCRIPTORS = 256


def _answer(status: str, body: str, *headers: str) -> bytes:
    """A whole HTTP answer that closes its connection, written before any request was read."""
    data = body.encode()
    head = [f"HTTP/1.1 {status}", "content-type: text/plain; charset=utf-8", *headers]
    head += ["connection: close", f"content-length: {len(data)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


_TIMED_OUT = _answer("408 Request Timeout", "the request headers did not arrive in time\n")
_BUSY = _answer("503 Service Unavailable", "too many connections; try again\n", "retry-after: 1")


def guarded(base: type[asyncio.Protocol], limits: Connections) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol ``base`` with the header deadline and the connection bound."""

    class Guarded(base):  # type: ignore[misc,valid-type]
        _deadline: asyncio.TimerHandle | None = None
        _armed_for: Any = None  # the request cycle that was current when the deadline was set
        _heard = False  # bytes arrived since then

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                logger.warning("%d connections open: refusing one", len(self.connections) - 1)
                self.transport.write(_BUSY)
                self.transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            self._heard = True
            super().data_received(data)
            if self._deadline is not None and self.cycle is not self._armed_for:
                self._disarm()  # a request's headers are complete: the app has it now

        def on_response_complete(self) -> None:
            super().on_response_complete()
            current = self.cycle
            if not self.transport.is_closing() and (current is None or current.response_complete):
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._armed_for, self._heard = self.cycle, False
            self._deadline = self.loop.call_later(limits.header_timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            if self._heard:
                self.transport.write(_TIMED_OUT)
            self.transport.close()

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded


def config(app: Any, connections: Connections | None = None, **options: Any) -> Any:
    """The ``uvicorn.Config`` of an app under ``connections``' limits; ``options`` are
    uvicorn's own (``log_level``...)."""
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    limits = connections or Connections()
    return uvicorn.Config(
        app,
        http=guarded(AutoHTTPProtocol, limits),
        timeout_keep_alive=limits.keep_alive_s,
        # Our own access log carries the request id (server/observe.py).
        access_log=False,
        **options,
    )


def fit_descriptors(connections: Connections) -> Connections:
    """Raise this process's soft limit on open files so that ``max_connections`` fit beside
    `RESERVED_DESCRIPTORS`; where the hard limit forbids it, fewer connections."""
    needed = connections.max_connections + RESERVED_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        fitted = max(1, soft - RESERVED_DESCRIPTORS)
        logger.warning(
            "%d open files allowed (ulimit -n): at most %d connections, not %d",
            soft,
            fitted,
            connections.max_connections,
        )
        return replace(connections, max_connections=fitted)
    return connections


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one (read it from ``getsockname()``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    return sock


def serve(app: Any, sock: socket.socket, connections: Connections | None = None) -> None:
    """Run the app with uvicorn on an already bound socket until SIGINT or SIGTERM."""
    import uvicorn

    _log_with_request_ids()
    limits = fit_descriptors(connections or Connections())
    server = uvicorn.Server(config(app, limits, log_level="info", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])


def _log_with_request_ids() -> None:
    """The library's log lines (the access log's too) on stderr, each with the id of the
    request it was written for: the id a client was answered with finds the line."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(levelname)s:     [%(request_id)s] %(message)s"))
    library = logging.getLogger("embeddingcache")
    library.addHandler(handler)
    library.setLevel(logging.INFO)
    library.propagate = False
