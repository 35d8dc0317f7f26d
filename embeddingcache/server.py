"""The backend: ``embeddingcache serve``, a FastAPI app over one `EmbeddingCache`.

The cache behind the app computes with the local model and never calls another backend.
Everything a client sends is checked by `embeddingcache.protocol`; what it gets wrong is
answered with a 4xx naming the mistake, so that no input produces a 5xx. A 503 means the
server's own storage or model failed.

FastAPI and uvicorn come with the ``server`` extra: ``pip install 'embeddingcache[server]'``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from . import openai_wire
from ._version import __version__
from .cache import EmbeddingCache
from .credentials import clean
from .engines import EmbedOptions
from .errors import (
    EmbeddingCacheError,
    InvalidInputError,
    ProviderError,
    StorageError,
    TextTooLongError,
)
from .keys import normalizer
from .models import ModelSpec, catalog_name
from .openai_wire import OpenAIRequest
from .protocol import (
    JSON,
    EmbedRequest,
    Limits,
    ProtocolError,
    PushRequest,
    decode_body,
    encode_body,
    encode_vectors,
    media_type,
    parse_embed_request,
    parse_push_request,
)

__all__ = ["Backend", "bind", "create_app", "serve"]

logger = logging.getLogger("embeddingcache.server")


@dataclass(frozen=True)
class Served:
    """A model this server computes, with the dimension its loaded weights give."""

    spec: ModelSpec
    dimension: int


class Backend:
    """What the app serves: the cache, the models, the token, the limits, the counters.

    The models are loaded here, before the server accepts a request, so that a model that
    cannot be loaded stops ``serve`` at once rather than failing every request.
    """

    def __init__(
        self,
        cache: EmbeddingCache,
        models: Sequence[str] = (),
        *,
        token: str | None = None,
        allow_push: bool = False,
        limits: Limits | None = None,
    ) -> None:
        if cache.remote_url is not None or "remote" in cache.fallback_providers:
            # A backend that asked a backend could end up asking itself.
            raise InvalidInputError(
                "a backend's cache computes locally: "
                "EmbeddingCache(remote_url=False, fallback_providers=('local',))"
            )
        self.cache = cache
        # A token read from a file ends with a newline that no client sends.
        self.token = clean(token, "token") or None
        self.allow_push = allow_push
        self.limits = limits or Limits()
        self.started = time.time()
        self.models: dict[str, Served] = {}
        self._aliases: dict[str, str] = {}
        for name in models or [cache.model]:
            spec = cache.model_spec(name)  # an API model at the cache's base_url
            self.models[spec.name] = Served(spec, cache.dimension(spec.name))
            self._aliases[name] = spec.name
        self.default_model = next(iter(self.models))
        self._counts = {
            "requests": 0,
            "rejected": 0,
            "failed": 0,
            "texts": 0,
            "accepted_pushes": 0,
        }
        self._lock = threading.Lock()

    def served(self, model: str | None, *, exact: bool = False) -> Served:
        """The served model a request names (the default one for ``None``).

        ``exact``: the name is a client's identity of the model, under which it stores what
        it is given (our protocol's ``/embed`` and ``/push``): it must be the served
        model's own name, or a catalog spelling of it, never the name ``serve`` was started
        with when that means another identity (``openai:M`` served at another endpoint is
        ``openai:M;endpoint=...``: a client storing its vectors as ``openai:M`` would hold
        another server's vectors under OpenAI's name). OpenAI's clients store nothing of
        ours: ``/v1/embeddings`` takes every name.
        """
        if model is None:
            return self.models[self.default_model]
        aliases = {} if exact else self._aliases
        name = catalog_name(model) or aliases.get(model, model)
        found = self.models.get(name) or self._api_variant(model, aliases)
        if found is None:
            meant = self._aliases.get(model)
            hint = (
                f"; {model!r} is served as {meant!r}: name it so, or resolve it as this "
                "server does (the same base_url)"
                if exact and meant is not None and meant != model
                else ""
            )
            raise ProtocolError(
                422,
                f"unknown model {model!r}; this server serves: {', '.join(self.models)}{hint}",
                code="unknown_model",
            )
        return found

    def _api_variant(self, model: str, aliases: dict[str, str]) -> Served | None:
        """A served API model asked for OpenAI's ``dimensions`` (``NAME;dimensions=N``, the
        shard name a client's ``get_embeddings(..., dimensions=N)`` asks for): the API is
        asked for them, into a shard of their own. ``None`` for anything else, a local
        model's name included (its ``dimensions`` are cut on read, by the client)."""
        base, marker, digits = model.rpartition(";dimensions=")
        if not marker or not digits.isdigit() or int(digits) < 1:
            return None
        served = self.models.get(catalog_name(base) or aliases.get(base, base))
        if served is None:
            return None
        spec = self.cache.model_spec(served.spec.name, dimensions=int(digits))
        if spec == served.spec:
            return None
        openai_wire.check_dimensions(int(digits), served.dimension)
        return Served(spec, int(digits))

    def embed(
        self, request: EmbedRequest, spec: ModelSpec | None = None
    ) -> tuple[np.ndarray, np.ndarray, Served, str | None]:
        """The vectors of a request (zeros where a lookup found nothing), which were stored
        already, and the model's version they are of; ``spec``: a variant of the served model
        (an API model asked for OpenAI's ``dimensions``), else the served model itself."""
        served = self.served(request.model, exact=spec is None)
        spec = spec or served.spec
        normalized, prompt = self._embedded(request.texts, request, spec)
        pipeline = self.cache.pipeline
        call = pipeline.prepare(spec, normalized, prompt)
        answer = pipeline.vectors(
            call,
            compute=not request.lookup_only,
            options=EmbedOptions(batch_size=self.cache.batch_size, truncate=request.truncate),
        )
        self.count(texts=len(request.texts))
        hits = answer.hits
        found = np.ones(len(normalized), dtype=bool) if hits is None else hits
        return answer.vectors, found, served, answer.version

    def embed_openai(
        self, request: OpenAIRequest
    ) -> tuple[np.ndarray, int, int, Served, str | None]:
        """``/v1/embeddings``: the vectors (with OpenAI's ``dimensions`` applied), the tokens
        of every input, the inputs served from the cache, the model and its version."""
        served = self.served_openai(request.model)
        spec = served.spec
        prompt: str | None = None
        if request.input_type is not None and spec.prompts:
            names = openai_wire.INPUT_TYPES[request.input_type]
            name = next((n for n in names if n in spec.prompts), None)
            if name is None:
                raise ProtocolError(
                    400,
                    f"model {spec.name!r} has no {' or '.join(map(repr, names))} prompt for "
                    f"input_type {request.input_type!r}; its prompts: "
                    f"{', '.join(sorted(spec.prompts))}",
                    param="input_type",
                )
            prompt = spec.prompts[name]
        # OpenAI's dimensions: an API model is asked for them (its shortened vectors are its
        # own, in a shard of their own, never cut from the full ones); a local model's are cut
        # from its stored vectors on read.
        asked = spec
        if request.dimensions is not None:
            openai_wire.check_dimensions(request.dimensions, served.dimension)
            asked = self.cache.model_spec(spec.name, dimensions=request.dimensions)
        vectors, hits, _, version = self.embed(
            EmbedRequest(texts=request.texts, model=spec.name, prompt=prompt), asked
        )
        tokens = self.cache.count_tokens(
            request.texts, spec.name, prompt=prompt if prompt is not None else spec.prompt(None)
        )
        shortened = vectors if asked != spec else openai_wire.shorten(vectors, request.dimensions)
        # A model whose engine has no tokenizer bills nothing it could count: 0.
        return shortened, sum(tokens or ()), int(hits.sum()), served, version

    def served_openai(self, model: str) -> Served:
        """The served model an OpenAI request names, or the 404 OpenAI's clients expect."""
        try:
            return self.served(model)
        except ProtocolError:
            raise ProtocolError(
                404,
                f"the model {model!r} does not exist on this server; it serves: "
                f"{', '.join(self.models)}",
                code="model_not_found",
                param="model",
            ) from None

    def push(self, request: PushRequest) -> int:
        """Store vectors a client computed; stored ones are never replaced. The number new.

        Raises:
            ProtocolError: 409, the client computed them at another version of the model
                than this server's.
        """
        served = self.served(request.model, exact=True)
        ours = self.cache.pipeline.version(served.spec)
        if request.version is not None and ours is not None and request.version != ours:
            raise ProtocolError(
                409,
                f"these vectors are of version {request.version} of model "
                f"{served.spec.name!r}; this server's is {ours}",
                code="version_mismatch",
            )
        normalized, prompt = self._embedded(request.texts, request, served.spec)
        call = self.cache.pipeline.prepare(served.spec, normalized, prompt)
        accepted = self.cache.pipeline.store(served.spec, call.embedded, request.vectors)
        self.count(accepted_pushes=accepted)
        return accepted

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        )

    def count(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                self._counts[name] += amount

    def stats(self) -> dict[str, Any]:
        with self._lock:
            counts = dict(self._counts)
        cache = self.cache.stats
        return {
            **counts,
            "hits": cache["hits"],
            "misses": cache["misses"],
            "computed": cache["computed"],
            # Texts another request (of this server, or of a replica over the same
            # database) computed while this one waited for them: computed once, served twice.
            "waited": cache["waited"],
            # Tokens since the server started (docs/storage.md, "What the cache saved"):
            # what its computed vectors cost, and the recorded cost of the hits it served.
            "tokens_computed": cache["tokens_computed"],
            "tokens_saved": cache["tokens_saved"],
            "tokens": self.cache.pipeline.token_stats,
            "uptime_s": round(time.time() - self.started, 3),
        }

    def _embedded(
        self, texts: list[str], request: EmbedRequest | PushRequest, spec: ModelSpec
    ) -> tuple[list[str], str]:
        try:
            prompt = spec.prompt(None) if request.prompt is None else request.prompt
        except InvalidInputError as exc:
            raise ProtocolError(422, str(exc)) from None
        if request.normalized:
            return texts, prompt
        norm = normalizer(self.cache.normalize)
        return [norm(text) for text in texts], prompt


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


def serve(app: FastAPI, sock: socket.socket, *, access_log: bool = False) -> None:
    """Run the app with uvicorn on an already bound socket until SIGINT or SIGTERM."""
    import uvicorn

    config = uvicorn.Config(
        app, access_log=access_log, log_level="info", timeout_graceful_shutdown=5
    )
    uvicorn.Server(config).run(sockets=[sock])
