"""The ASGI app of a `Backend`: its routes, how a request's body is read and refused, and how
the library's errors become answers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
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
from .answers import EXPOSED, error_answer
from .backend import Backend, Embedded
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .observe import Observed

__all__ = ["create_app"]

logger = logging.getLogger("embeddingcache.server")


def create_app(
    backend: Backend, *, cors_origins: Sequence[str] = (), access_log: bool = False
) -> FastAPI:
    """The ASGI app of a backend; closing the app (lifespan end) closes its cache.

    ``cors_origins``: the browser origins that may call it (``"*"``: any); none by default.
    ``access_log``: a log line per request, with its id and time.
    """

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
        # A 307 to the path with(out) a slash fails many clients' POSTs; `Observed` strips it.
        redirect_slashes=False,
    )
    app.state.backend = backend
    metrics = Metrics(backend)
    _answer_errors(app, backend)
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            # OpenAI's browser clients send headers of their own (x-stainless-*).
            allow_headers=["*"],
            expose_headers=["x-request-id", *EXPOSED],
            max_age=600,
        )
    app.add_middleware(Observed, metrics=metrics, access_log=access_log)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        _authorize(backend, request)
        body = await run_in_threadpool(metrics.render)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

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
        embedded: Embedded = await _run(backend, backend.embed, parsed)
        present = embedded.stored if parsed.lookup_only else None
        answer = {
            "embeddings": encode_vectors(embedded.vectors, present, kind),
            "cache_hits": embedded.stored.tolist(),
            "model": embedded.served.spec.name,
            "dimensions": embedded.served.dimension,
            "version": embedded.version,
        }
        headers = embedded.sources.headers()
        return Response(encode_body(answer, kind), media_type=kind, headers=headers)

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
        accepted = await _run(backend, backend.push, parsed)
        served = backend.served(parsed.model, exact=True)
        answer = {"accepted": accepted, "model": served.spec.name, "dimensions": served.dimension}
        return Response(encode_body(answer, kind), media_type=kind)

    @app.post("/v1/embeddings")
    async def openai_embeddings(request: Request) -> Response:
        await _admit(backend, request)
        # OpenAI's clients send JSON; curl's -d names a form: every body here is JSON.
        obj = await _read_body(backend, request, JSON)
        parsed = openai_wire.parse_request(obj, backend.limits)
        embedded, tokens = await _run(backend, backend.embed_openai, parsed, invalid=400)
        body = openai_wire.response_body(
            embedded.vectors, parsed.model, tokens, parsed.encoding_format
        )
        headers = embedded.sources.headers()
        headers["x-embeddingcache-model"] = embedded.served.spec.name
        if embedded.version is not None:
            headers["x-embeddingcache-version"] = embedded.version
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


def _answer_errors(app: FastAPI, backend: Backend) -> None:
    """Every error in one shape per route family: OpenAI's under ``/v1``, ours elsewhere
    (`answers.error_answer`), for the library's refusals and for Starlette's 404 and 405."""

    @app.exception_handler(ProtocolError)
    async def protocol_error(request: Request, exc: ProtocolError) -> Response:
        backend.count(**{"rejected" if exc.status < 500 else "failed": 1})
        return error_answer(request.url.path, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        method, path = request.method, request.url.path
        if exc.status_code == 404:
            refusal = ProtocolError(
                404, f"no such route: {method} {path} (see docs/protocol.md)", code="unknown_url"
            )
        elif exc.status_code == 405:
            given = {name.lower(): value for name, value in (exc.headers or {}).items()}
            allowed = given.get("allow", "")
            refusal = ProtocolError(
                405,
                f"{method} is not allowed on {path}; it takes {allowed}",
                code="method_not_allowed",
            )
        else:
            refusal = ProtocolError(exc.status_code, str(exc.detail), code="invalid")
        return error_answer(path, refusal, exc.headers)


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


async def _run(backend: Backend, function: Any, request: Any, *, invalid: int = 422) -> Any:
    """Run blocking work (the database, the model) off the event loop, translating the
    library's errors into answers; ``invalid``: the status of a text the model refuses (422
    on our routes, 400 on OpenAI's)."""
    try:
        return await run_in_threadpool(function, request)
    except ProtocolError:
        raise
    except TextTooLongError as exc:
        raise ProtocolError(
            invalid, str(exc), code="too_many_tokens", index=exc.index, param="input"
        ) from None
    except InvalidInputError as exc:
        raise ProtocolError(invalid, str(exc)) from None
    except StorageError as exc:
        backend.count(storage_errors=1)
        logger.error("storage failed: %s", exc)
        raise ProtocolError(
            503, f"the server's storage failed: {exc}", code="unavailable"
        ) from None
    except ProviderError as exc:
        logger.error("model failed: %s", exc)
        raise ProtocolError(503, f"the server's model failed: {exc}", code="unavailable") from None
    except EmbeddingCacheError as exc:
        raise ProtocolError(503, str(exc), code="unavailable") from None
