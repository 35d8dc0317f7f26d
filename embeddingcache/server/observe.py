"""What every request passes through before the routes: its request id, its path without a
trailing slash, and its measure (the metrics, the access log).

A plain ASGI middleware, not Starlette's ``BaseHTTPMiddleware``: it wraps ``send`` and adds
nothing else to the hot path.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..protocol import ProtocolError
from .answers import error_answer
from .metrics import Metrics

__all__ = ["REQUEST_ID", "Observed", "RequestIdFilter", "route_of"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The id of the request being served, for the log lines written while it is ("-": none).
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
HEADER = b"x-request-id"
# A client's own id is kept when it is short and plain: it goes into log lines as it is.
_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")
# The routes by name, for the metrics' labels: a path nobody serves is "other", so that
# scanners cannot make a label of every path they try.
ROUTES = frozenset(
    {"/embed", "/push", "/healthz", "/models", "/stats", "/metrics", "/v1/embeddings", "/v1/models"}
)

access = logging.getLogger("embeddingcache.access")
logger = logging.getLogger("embeddingcache.server")


def route_of(path: str) -> str:
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == HEADER:
            if _CLIENT_ID.fullmatch(value):
                return str(value.decode("ascii"))
            break
    return uuid.uuid4().hex


class Observed:
    """The middleware: every answer carries ``x-request-id`` (the client's own, else a new
    one), log lines written while serving it carry it too (`RequestIdFilter`), and the
    request is counted and timed in ``metrics``; ``/v1/embeddings/`` is ``/v1/embeddings``
    (a redirect would turn a POST into a failed request for many clients)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, *, access_log: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            scope["path"] = path = path.rstrip("/") or "/"
        request_id = _request_id(scope)
        token = REQUEST_ID.set(request_id)
        status = 0  # no answer started yet
        started = time.perf_counter()

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                headers.append((HEADER, request_id.encode("ascii")))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            # A bug, not a refusal: logged with its id, answered in the route's shape.
            logger.exception("unexpected error serving %s %s", scope["method"], path)
            if status:
                raise
            failure = ProtocolError(
                500, f"internal error; the server's log has it under {request_id}", code="internal"
            )
            await error_answer(path, failure)(scope, receive, sending)
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.observe(route_of(path), scope["method"], status, elapsed)
            if self.access_log:
                client = scope.get("client") or ("-", 0)
                access.info(
                    '%s "%s %s" %d %.1f ms', client[0], scope["method"], path, status, elapsed * 1e3
                )
            REQUEST_ID.reset(token)


class RequestIdFilter(logging.Filter):
    """Gives each log record the ``request_id`` of the request being served ("-": none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True
