"""The ASGI app of a `Backend`: its routes, how a request's body is read and refused, and how
the library's errors become answers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from .. import openai_wire
from .._version import __version__
from ..errors import (
    EmbeddingCacheError,
    InvalidInputError,
    ProviderError,
    StorageError,
    TextTooLongError,
)
from ..protocol import (
    JSON,
    ProtocolError,
    decode_body,
    encode_body,
    encode_vectors,
    media_type,
    parse_embed_request,
    parse_push_request,
)
from .backend import Backend

__all__ = ["create_app"]

logger = logging.getLogger("embeddingcache.server")


def create_app(backend: Backend) -> FastAPI:
    """The ASGI app of a backend; closing the app (lifespan end) closes its cache."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(backend.cache.close)

    app = FastAPI(
        title="embeddingcache",
        version=__version__,
        lifespan=lifespan,
        # The bodies are msgpack, which OpenAPI cannot describe: docs/protocol.md does.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.backend = backend

    @app.exception_handler(ProtocolError)
    async def protocol_error(request: Request, exc: ProtocolError) -> Response:
        backend.count(**{"rejected" if exc.status < 500 else "failed": 1})
        if request.url.path.startswith("/v1/"):
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            return JSONResponse(
                openai_wire.error_body(exc), status_code=exc.status, headers=headers
            )
        body: dict[str, Any] = {"detail": str(exc), "error": exc.code}
        if exc.index is not None:
            body["index"] = exc.index
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(body, status_code=exc.status, headers=headers)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    @app.get("/models")
    async def models(request: Request) -> dict[str, Any]:
        _authorize(backend, request)
        return {
            "default": backend.default_model,
            "models": [
                {
                    "name": name,
                    "dimensions": served.dimension,
                    "prompts": dict(served.spec.prompts),
                    "default_prompt": served.spec.default_prompt,
                    "version": backend.cache.pipeline.version(served.spec),
                }
                for name, served in backend.models.items()
            ],
            "limits": {
                "max_texts": backend.limits.max_texts,
                "max_text_chars": backend.limits.max_text_chars,
                "max_body_bytes": backend.limits.max_body_bytes,
            },
            "push": backend.allow_push,
            "version": __version__,
        }

    @app.get("/stats")
    async def stats(request: Request) -> dict[str, Any]:
        _authorize(backend, request)
        return backend.stats()

    @app.post("/embed")
    async def embed(request: Request) -> Response:
        kind, obj = await _read(backend, request)
        parsed = parse_embed_request(obj, backend.limits)
        vectors, hits, served, version = await _run(backend.embed, parsed)
        present = hits if parsed.lookup_only else None
        answer = {
            "embeddings": encode_vectors(vectors, present, kind),
            "cache_hits": hits.tolist(),
            "model": served.spec.name,
            "dimensions": served.dimension,
            "version": version,
        }
        return Response(encode_body(answer, kind), media_type=kind)

    @app.post("/push")
    async def push(request: Request) -> Response:
        if not backend.allow_push:
            backend.count(requests=1)
            _authorize(backend, request)
            raise ProtocolError(
                403,
                "this server does not take pushed vectors (start it with --allow-push)",
                code="push_disabled",
            )
        kind, obj = await _read(backend, request)

        def dimension_of(model: str | None) -> int:
            return backend.served(model, exact=True).dimension

        parsed = parse_push_request(obj, kind, backend.limits, dimension_of)
        accepted = await _run(backend.push, parsed)
        served = backend.served(parsed.model, exact=True)
        answer = {"accepted": accepted, "model": served.spec.name, "dimensions": served.dimension}
        return Response(encode_body(answer, kind), media_type=kind)

    @app.post("/v1/embeddings")
    async def openai_embeddings(request: Request) -> Response:
        await _admit(backend, request)
        # OpenAI's clients send JSON; curl's -d names a form: every body here is JSON.
        obj = await _read_body(backend, request, JSON)
        parsed = openai_wire.parse_request(obj, backend.limits)
        vectors, tokens, hits, served, version = await _run(backend.embed_openai, parsed)
        body = openai_wire.response_body(vectors, parsed.model, tokens, parsed.encoding_format)
        headers = {
            "x-embeddingcache-hits": str(hits),
            "x-embeddingcache-computed": str(len(parsed.texts) - hits),
            "x-embeddingcache-model": served.spec.name,
        }
        if version is not None:
            headers["x-embeddingcache-version"] = version
        return Response(body, media_type=JSON, headers=headers)

    @app.get("/v1/models")
    async def openai_models(request: Request) -> dict[str, Any]:
        _authorize(backend, request)
        return openai_wire.models_body(list(backend.models), int(backend.started))

    @app.get("/v1/models/{model:path}")
    async def openai_model(request: Request, model: str) -> dict[str, Any]:
        _authorize(backend, request)
        served = backend.served_openai(model)
        return openai_wire.model_item(served.spec.name, int(backend.started))

    return app


def _authorize(backend: Backend, request: Request) -> None:
    if not backend.authorized(request.headers.get("authorization")):
        raise ProtocolError(
            401,
            "missing or wrong bearer token (Authorization: Bearer <token>)",
            code="unauthorized",
        )


async def _read(backend: Backend, request: Request) -> tuple[str, Any]:
    """The format and decoded object of a request's body, refusing it as early as possible:
    a wrong token or content type before reading, an oversized body as soon as it shows."""
    await _admit(backend, request)
    kind = media_type(request.headers.get("content-type"))
    return kind, await _read_body(backend, request, kind)


async def _admit(backend: Backend, request: Request) -> None:
    """Count the request and check its token, before its body is read."""
    backend.count(requests=1)
    _authorize(backend, request)


async def _read_body(backend: Backend, request: Request, kind: str) -> Any:
    """The decoded body, refused with a 413 as soon as it shows to be too large."""
    limit = backend.limits.max_body_bytes
    declared = request.headers.get("content-length")
    # (The HTTP layer has refused a Content-Length that is not a number already.)
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProtocolError(
            413, f"the body is larger than this server's limit of {limit} bytes", code="too_large"
        )
    try:
        body = await asyncio.wait_for(_body(request, limit), backend.limits.body_timeout_s)
    except asyncio.TimeoutError:  # builtin TimeoutError from 3.11 on only
        raise ProtocolError(
            408,
            f"the body did not arrive within {backend.limits.body_timeout_s:g} s",
            code="timeout",
        ) from None
    except ClientDisconnect:
        raise ProtocolError(400, "the client went away before its body", code="malformed") from None
    # Decoding a large body is CPU work: off the event loop, so that other requests go on.
    return await run_in_threadpool(decode_body, body, kind, backend.limits)


async def _body(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(
                413,
                f"the body is larger than this server's limit of {limit} bytes",
                code="too_large",
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def _run(function: Any, request: Any) -> Any:
    """Run blocking work (the database, the model) off the event loop, translating the
    library's errors into answers."""
    try:
        return await run_in_threadpool(function, request)
    except ProtocolError:
        raise
    except TextTooLongError as exc:
        raise ProtocolError(422, str(exc), code="too_many_tokens", index=exc.index) from None
    except InvalidInputError as exc:
        raise ProtocolError(422, str(exc)) from None
    except StorageError as exc:
        logger.error("storage failed: %s", exc)
        raise ProtocolError(
            503, f"the server's storage failed: {exc}", code="unavailable"
        ) from None
    except ProviderError as exc:
        logger.error("model failed: %s", exc)
        raise ProtocolError(503, f"the server's model failed: {exc}", code="unavailable") from None
    except EmbeddingCacheError as exc:
        raise ProtocolError(503, str(exc), code="unavailable") from None
