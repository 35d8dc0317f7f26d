"""The shape of an error answer: OpenAI's under ``/v1`` (``{"error": {"message", "type",
"param", "code"}}``, what its clients parse), ours elsewhere (``{"detail", "error"}`` and the
``index`` of a bad text, docs/protocol.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse

from .. import openai_wire
from ..protocol import ProtocolError

__all__ = ["EXPOSED", "error_answer", "is_openai"]

# The headers an answer carries about where its vectors came from (`backend.Sources`).
EXPOSED = (
    "x-embeddingcache-hits",
    "x-embeddingcache-waited",
    "x-embeddingcache-computed",
    "x-embeddingcache-model",
    "x-embeddingcache-version",
)
# Statuses after which the connection is closed: what is left of the body is never read.
_CLOSING = frozenset({408, 413})


def is_openai(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def error_answer(
    path: str, exc: ProtocolError, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    body: dict[str, Any]
    if is_openai(path):
        body = openai_wire.error_body(exc)
    else:
        body = {"detail": str(exc), "error": exc.code}
        if exc.index is not None:
            body["index"] = exc.index
    extra = dict(headers or {})
    if exc.status == 401:
        extra["WWW-Authenticate"] = "Bearer"
    if exc.status in _CLOSING:
        extra["connection"] = "close"
    return JSONResponse(body, status_code=exc.status, headers=extra or None)
