"""What ``serve`` serves: the `Backend` (the cache, its models, the token, the limits, the
counters), and how each route's request is answered by the cache. HTTP lives in `.app`."""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from .. import openai_wire
from ..cache import EmbeddingCache
from ..credentials import clean
from ..engines import EmbedOptions
from ..errors import InvalidInputError, TextTooLongError
from ..keys import normalizer
from ..models import ModelSpec, catalog_name
from ..openai_wire import OpenAIRequest
from ..protocol import EmbedRequest, Limits, ProtocolError, PushRequest

__all__ = ["Backend", "Embedded", "Served", "Sources"]


@dataclass(frozen=True)
class Served:
    """A model this server computes, with the dimension its loaded weights give."""

    spec: ModelSpec
    dimension: int


@dataclass(frozen=True)
class Sources:
    """Where a request's inputs came from, counted by input (a text sent twice counts
    twice), as the answer's headers and ``/stats`` say: ``stored`` (the store held them),
    ``waited`` (another request computed them while this one waited), ``computed`` (this
    request computed them), ``not_found`` (a lookup-only request's misses)."""

    stored: int
    waited: int
    computed: int
    not_found: int

    @classmethod
    def of(
        cls, n: int, stored: np.ndarray, waited: np.ndarray | None, *, computed: bool
    ) -> Sources:
        held = int(stored.sum())
        waits = 0 if waited is None else int(waited.sum())
        rest = n - held - waits
        return cls(held, waits, rest if computed else 0, 0 if computed else rest)

    def counts(self) -> dict[str, int]:
        return asdict(self)

    def headers(self) -> dict[str, str]:
        """The answer's ``x-embeddingcache-*`` counts."""
        return {
            "x-embeddingcache-hits": str(self.stored),
            "x-embeddingcache-waited": str(self.waited),
            "x-embeddingcache-computed": str(self.computed),
        }


@dataclass(frozen=True)
class Embedded:
    """A request's vectors in input order, which the store held, where they came from, the
    served model and the model's version they are of."""

    vectors: np.ndarray
    stored: np.ndarray
    sources: Sources
    served: Served
    version: str | None


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
        truncate: bool = False,
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
        # /v1's default for an input longer than the model takes: cut it, or refuse it.
        # (/embed's clients, this library, always say which they want.)
        self.truncate = truncate
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
            **dict.fromkeys((f.name for f in fields(Sources)), 0),
            "storage_errors": 0,
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

    def embed(self, request: EmbedRequest, spec: ModelSpec | None = None) -> Embedded:
        """The vectors of a request (zeros where a lookup found nothing) and where each came
        from; ``spec``: a variant of the served model (an API model asked for OpenAI's
        ``dimensions``), else the served model itself."""
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
        n = len(normalized)
        stored = np.ones(n, dtype=bool) if answer.hits is None else answer.hits
        sources = Sources.of(n, stored, answer.waited, computed=not request.lookup_only)
        self.count(texts=n, **sources.counts())
        return Embedded(answer.vectors, stored, sources, served, answer.version)

    def embed_openai(self, request: OpenAIRequest) -> tuple[Embedded, int]:
        """``/v1/embeddings``: the vectors (with OpenAI's ``dimensions`` applied) and where
        each came from, and the tokens of every input."""
        served = self.served_openai(request.model)
        spec = served.spec
        prompt = self._openai_prompt(spec, request.input_type)
        # OpenAI's dimensions: an API model is asked for them (its shortened vectors are its
        # own, in a shard of their own, never cut from the full ones); a local model's are cut
        # from its stored vectors on read.
        asked = spec
        if request.dimensions is not None:
            openai_wire.check_dimensions(request.dimensions, served.dimension)
            asked = self.cache.model_spec(spec.name, dimensions=request.dimensions)
        truncate = self.truncate if request.truncate is None else request.truncate
        embed = EmbedRequest(texts=request.texts, model=spec.name, prompt=prompt, truncate=truncate)
        try:
            embedded = self.embed(embed, asked)
        except TextTooLongError as exc:
            raise openai_wire.too_long(exc, spec.name, single=request.single) from None
        tokens = self.cache.count_tokens(
            request.texts, spec.name, prompt=prompt if prompt is not None else spec.prompt(None)
        )
        if asked == spec and request.dimensions is not None:
            embedded = replace(
                embedded, vectors=openai_wire.shorten(embedded.vectors, request.dimensions)
            )
        # A model whose engine has no tokenizer bills nothing it could count: 0.
        return replace(embedded, served=served), sum(tokens or ())

    @staticmethod
    def _openai_prompt(spec: ModelSpec, input_type: str | None) -> str | None:
        """The prompt an OpenAI request's ``input_type`` picks (``None``: the default)."""
        if input_type is None or not spec.prompts:
            return None
        names = openai_wire.INPUT_TYPES[input_type]
        name = next((n for n in names if n in spec.prompts), None)
        if name is None:
            raise ProtocolError(
                400,
                f"model {spec.name!r} has no {' or '.join(map(repr, names))} prompt for "
                f"input_type {input_type!r}; its prompts: {', '.join(sorted(spec.prompts))}",
                param="input_type",
            )
        return spec.prompts[name]

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
        """What ``/stats`` and ``/metrics`` say. The texts are counted by input, as each
        answer's headers count them, so that the headers of all answers add up to these."""
        with self._lock:
            counts = dict(self._counts)
        cache = self.cache.stats
        return {
            **counts,
            "hits": counts["stored"],
            "misses": counts["texts"] - counts["stored"],
            # Vectors the server returned but could not store (a full disk, a storage fault).
            "not_stored": cache["not_stored"],
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
