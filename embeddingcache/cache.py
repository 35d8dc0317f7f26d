"""EmbeddingCache: validate, normalize, key, look up, compute what is missing, store, return."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from . import travel
from ._util import positive_int
from .config import (
    resolve_cache_dir,
    resolve_db_url,
    resolve_memory_size,
    resolve_model_name,
    resolve_remote_url,
    resolve_token,
)
from .credentials import clean
from .engines import EmbedOptions, EngineSettings
from .errors import InvalidInputError, InvalidInputTypeError, TextTooLongError
from .keys import normalizer, validate_texts
from .models import ModelSpec, endpoint_of, resolve_model
from .options import CallOptions, Checked, check
from .pipeline import CHAINS, Pipeline
from .progress import Progress
from .reading import Dtype, Output, apply
from .storage import Store, layout_for
from .upkeep import Upkeep

if TYPE_CHECKING:
    import torch
    from typing_extensions import Unpack

__all__ = ["EmbeddingCache"]

logger = logging.getLogger("embeddingcache")

PROVIDERS = CHAINS  # the names fallback_providers may hold
# Texts per chunk of iter_embeddings: a few slices of computing, a few MB of vectors.
CHUNK_TEXTS = 10_000


class EmbeddingCache(Upkeep):
    """A read-through cache of text embeddings.

    Every distinct embedded string (the normalized text with the model's prompt in front) is
    computed once per model and then read from storage: SQLite files in ``cache_dir`` by default.

    Args:
        model: the default model of this cache's calls; a catalog name
            (``nomic-embed-text-v2``, ``all-MiniLM-L6-v2``), a Hugging Face id or a local
            model folder. Default: ``EMBEDDING_CACHE_MODEL``, else ``nomic-embed-text-v2``.
        cache_dir: directory of the SQLite files. Default: ``EMBEDDING_CACHE_DIR``, else
            ``~/.cache/embedding-cache``.
        db_url: a database URL to hold the cache instead (``EMBEDDING_CACHE_DB_URL``).
        remote_url: an ``embeddingcache serve`` backend (``EMBEDDING_CACHE_URL``); ``False``
            turns it off even when the variable is set.
        fallback_providers: who computes misses, in order: ``"local"``, ``"remote"``.
        normalize: the default normalization policy: ``"strip"``, ``"lower"`` or ``"none"``.
        timeout: seconds to wait for the remote backend (each request; 5 by default).
        token: the backend's bearer token (``EMBEDDING_CACHE_TOKEN``).
        push: offer the vectors computed here to the backend (it must run with
            ``--allow-push``); a failed push is logged, never raised.
        batch_size: texts per forward pass of the local model.
        device: ``"cpu"``, ``"cuda"``, ``"mps"``...; default: the best one available.
        max_size: a budget in bytes on disk for a SQLite cache directory: when a write takes
            the cache over it, the least recently used entries are removed until it takes
            90% of it (see `prune`).
        base_url: where ``openai:`` models are computed, an OpenAI-compatible API
            (``POST {base_url}/embeddings``); default ``OPENAI_BASE_URL``, else OpenAI's.
            Its endpoint (scheme, host, port, path) is part of the model's identity: the
            same model name at two endpoints never shares a shard.
        memory_size: bytes of the vectors served or stored last that this process keeps in
            memory, by shard and key, to answer a repeated text without a query
            (``EMBEDDING_CACHE_MEMORY_SIZE``; default 4 MiB; 0 turns it off).
        api_key: the key of that API; default ``OPENAI_API_KEY``. Never stored, logged or
            shown. Outer whitespace (a key read from a file ends with a newline) is
            stripped, from ``token`` too.

    Raises:
        InvalidInputError: an unknown provider or normalization policy, ``max_size``
            with a database URL, a ``base_url`` holding credentials, or a key or token
            holding a character an HTTP header cannot carry (never shown).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        db_url: str | None = None,
        remote_url: str | bool | None = None,
        fallback_providers: Sequence[str] = PROVIDERS,
        normalize: str = "strip",
        timeout: float = 5.0,
        token: str | None = None,
        push: bool = False,
        batch_size: int = 32,
        device: str | None = None,
        max_size: int | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        memory_size: int | None = None,
    ) -> None:
        # The settings taken from the environment travel by reference (`travel`).
        given = {"db_url": db_url, "token": token}
        self._from_env = frozenset(name for name, value in given.items() if value is None)
        self.model = resolve_model_name(model)
        self.cache_dir = resolve_cache_dir(cache_dir)
        self.db_url = resolve_db_url(db_url)
        self.remote_url = resolve_remote_url(remote_url)
        self.fallback_providers = _checked_providers(fallback_providers)
        normalizer(normalize)  # fail now on an unknown policy
        self.normalize = normalize
        self.timeout = _checked_timeout(timeout)
        self.token = resolve_token(token)
        self.push = bool(push)
        self.batch_size = positive_int(batch_size, "batch_size")
        self.device = device
        self.max_size = _checked_max_size(max_size, self.db_url)
        self.base_url = _checked_base_url(base_url)
        api_key = clean(api_key, "api_key")
        self.memory_size = resolve_memory_size(memory_size)
        self._store = Store(layout_for(self.cache_dir, self.db_url), memory_size=self.memory_size)
        self.pipeline = Pipeline(
            self._store,
            settings=EngineSettings(
                device=device,
                batch_size=self.batch_size,
                remote_url=self.remote_url,
                timeout=self.timeout,
                token=self.token,
                base_url=base_url,
                api_key=api_key,
            ),
            chain=self.fallback_providers,
            push=self.push,
            max_size=max_size,
        )
        self._default_options = EmbedOptions(batch_size=self.batch_size)
        # A cache dropped without close(), or left open at exit, still writes the use
        # counts it queued. The finalizer holds the Store (which never references the
        # cache), so it keeps nothing of the cache alive.
        self._flush_when_dropped = weakref.finalize(self, self._store.flush)

    # -- public API -----------------------------------------------------------------------

    # The overloads differ in `output` alone; each other option is one key of CallOptions.
    @overload
    def get_embeddings(
        self,
        texts: str | Sequence[str],
        model: str | None = None,
        *,
        output: Literal["numpy"] = "numpy",
        **options: Unpack[CallOptions],
    ) -> np.ndarray: ...

    @overload
    def get_embeddings(
        self,
        texts: str | Sequence[str],
        model: str | None = None,
        *,
        output: Literal["list"],
        **options: Unpack[CallOptions],
    ) -> list[float] | list[list[float]]: ...

    @overload
    def get_embeddings(
        self,
        texts: str | Sequence[str],
        model: str | None = None,
        *,
        output: Literal["torch"],
        **options: Unpack[CallOptions],
    ) -> torch.Tensor: ...

    def get_embeddings(
        self,
        texts: str | Sequence[str],
        model: str | None = None,
        *,
        normalize: str | None = None,
        batch_size: int | None = None,
        show_progress: bool = False,
        normalize_embeddings: bool = False,
        dimensions: int | None = None,
        dtype: Dtype = "float32",
        truncate: bool = False,
        prompt_name: str | None = None,
        prompt: str | None = None,
        output: Output = "numpy",
        base_url: str | None = None,
        api_key: str | None = None,
    ) -> np.ndarray | list[float] | list[list[float]] | torch.Tensor:
        """Embeddings of ``texts``, computed only for what the cache does not hold.

        Returns a ``(dim,)`` array for a ``str`` and an ``(n, dim)`` array, in input order,
        for a sequence; ``output="list"`` gives Python lists instead, ``output="torch"`` a
        tensor. ``dimensions`` (keep the first ones, for Matryoshka models),
        ``normalize_embeddings`` (unit length, after ``dimensions``) and ``dtype`` are applied
        on read: the stored vector is always the model's raw float32 output. ``prompt_name``
        picks one of the model's prompts (``"document"``, the default, or ``"query"`` for
        nomic-embed-text-v2); ``prompt`` gives the prefix itself instead (``""`` for none),
        as sentence-transformers' ``encode(prompt=...)`` does. Either way the prompt is part
        of the embedded string, hence of the key. ``show_progress`` draws one bar on stderr
        for the whole call: texts per second, the hits and computed so far, and the model's
        loading bars when it loads (never the model's own per-batch bar).

        For an ``openai:`` model, ``base_url`` and ``api_key`` override the cache's for this
        call, and ``dimensions`` is sent to the API as OpenAI's ``dimensions``: the vectors
        it returns for one setting have a shard of their own, never served for another.

        Raises:
            InvalidInputError: a text is ``None``, empty or whitespace only (a ``ValueError``).
            InvalidInputTypeError: a text is not a ``str`` (a ``TypeError``).
            TextTooLongError: a text is longer than the model accepts, ``truncate`` false.
            AllProvidersFailedError: vectors were missing and nobody could compute them.
            StorageError: the cache could not be read or written, and never could in this
                process (once it has worked, a fault is an ``EmbeddingCacheWarning`` and the
                call returns computed vectors); or a shard of another model or dimension.
        """
        total = 1 if isinstance(texts, str) else len(texts) if isinstance(texts, Sized) else None
        with Progress(total, enabled=show_progress) as progress:
            items, single = validate_texts(texts)
            checked = check(  # by name: a **options dict cost a cached text 20% (issue 27)
                self,
                model,
                self._default_options,
                progress.enabled,
                normalize=normalize,
                batch_size=batch_size,
                normalize_embeddings=normalize_embeddings,
                dimensions=dimensions,
                dtype=dtype,
                truncate=truncate,
                prompt_name=prompt_name,
                prompt=prompt,
                output=output,
                base_url=base_url,
                api_key=api_key,
            )
            result: np.ndarray | list[float] | list[list[float]] | torch.Tensor = self._vectors(
                items, single, checked, progress
            )
        return result

    def _get(
        self, texts: str | Sequence[str], model: str | None, progress: Progress, **options: Any
    ) -> Any:
        """`get_embeddings` of one chunk of `iter_embeddings`, moving ``progress``."""
        items, single = validate_texts(texts)
        checked = check(self, model, self._default_options, progress.enabled, **options)
        return self._vectors(items, single, checked, progress)

    def _vectors(self, items: list[str], single: bool, checked: Checked, progress: Progress) -> Any:
        """The vectors of validated texts with checked options, moving ``progress``."""
        call = self.pipeline.prepare(
            checked.spec, list(map(checked.normalize, items)), checked.prefix
        )
        if not progress.enabled:
            vectors = self.pipeline.vectors(call, options=checked.embed).vectors
        else:
            vectors = self.pipeline.vectors(
                call, options=checked.embed, progress=progress.slice
            ).vectors
            progress.add(len(items) - len(call.firsts))  # the repeats of texts done
        return apply(vectors, checked.read, model=checked.spec.name, single=single)

    def embed(
        self, text_or_texts: str | Sequence[str], model: str | None = None, **options: Any
    ) -> list[float] | list[list[float]]:
        """Like `get_embeddings`, as Python floats: a list for a ``str``, a list of
        lists for a sequence."""
        if "output" in options:
            raise InvalidInputError(
                "embed() always returns lists; for another output use get_embeddings(output=...)"
            )
        return self.get_embeddings(text_or_texts, model, **options, output="list")

    def iter_embeddings(
        self,
        texts: Iterable[str],
        model: str | None = None,
        *,
        chunk_size: int = CHUNK_TEXTS,
        **options: Any,
    ) -> Iterator[np.ndarray]:
        """Embeddings of any iterable of texts (a generator over a file, a database cursor),
        as ``(n, dim)`` arrays in input order, ``chunk_size`` texts at a time (the last chunk
        may be shorter). Each chunk is a `get_embeddings` call, with its ``options``: what it
        computes is stored as it goes, and memory is bounded by the chunk, not the corpus.
        Nothing is read from ``texts`` before the first array is asked for.
        ``show_progress=True`` draws one bar for the whole iteration (with an ETA when
        ``texts`` has a length).

        Raises:
            InvalidInputTypeError: ``texts`` is a ``str`` (pass a list of texts).
            InvalidInputError: ``output`` is asked for (this yields arrays), or as
                `get_embeddings`; an error names the index in the whole input.
            TextTooLongError, AllProvidersFailedError, StorageError: as `get_embeddings`.
        """
        if isinstance(texts, (str, bytes)):
            raise InvalidInputTypeError(
                "iter_embeddings takes an iterable of texts, not a single "
                f"{type(texts).__name__}; for one text use get_embeddings"
            )
        if "output" in options:
            raise InvalidInputError(
                "iter_embeddings yields numpy arrays; for lists use get_embeddings(output=...)"
            )
        positive_int(chunk_size, "chunk_size")
        total = len(texts) if isinstance(texts, Sized) else None
        return _chunks(self._get, iter(texts), model, chunk_size, total, options)

    def missing(
        self, texts: Iterable[str], model: str | None = None, **options: Unpack[CallOptions]
    ) -> list[str]:
        """The distinct texts of ``texts`` whose vectors the store lacks, in the order they
        first appear, as given: what a `get_embeddings` call with the same ``options``
        would compute (or ask the backend for). It reads keys only, in one pass, and
        computes, loads and stores nothing. A job sends only these to its workers, and a
        rerun of a finished job sends nothing. Memory is bounded by what is missing, so
        ``texts`` may be a generator over a corpus.

        Raises:
            InvalidInputTypeError: ``texts`` is a ``str``, or holds something else.
            InvalidInputError: as `get_embeddings`; an error names the index in ``texts``.
            StorageError: the store could not be read.
        """
        if isinstance(texts, (str, bytes)):
            raise InvalidInputTypeError("missing() takes an iterable of texts, not one text")
        options.pop("show_progress", None)  # nothing is computed, hence nothing shown
        checked = check(self, model, self._default_options, False, **options)  # type: ignore[misc]
        return _missing(self.pipeline, checked, iter(texts))

    async def aget_embeddings(
        self, texts: str | Sequence[str], model: str | None = None, **options: Any
    ) -> Any:
        """`get_embeddings` for async code, returning what it returns: it runs in a
        worker thread (the cache is thread-safe), so neither a hit nor a model computing
        blocks the event loop."""
        return await asyncio.to_thread(
            functools.partial(self.get_embeddings, **options), texts, model
        )

    async def aembed(
        self, text_or_texts: str | Sequence[str], model: str | None = None, **options: Any
    ) -> list[float] | list[list[float]]:
        """`embed` for async code, in a worker thread."""
        return await asyncio.to_thread(self.embed, text_or_texts, model, **options)

    def dimension(self, model: str | None = None) -> int:
        """The dimension of a model's vectors: from its shard, else from loading the model.

        Raises:
            DimensionMismatchError: the shard holds vectors of another dimension than the
                loaded model gives (the shard was filled by another model of that name).
            ProviderError: the model is not stored and cannot be loaded here.
        """
        return self.pipeline.dimension(self.model_spec(model))

    def count_tokens(
        self,
        texts: Sequence[str],
        model: str | None = None,
        *,
        prompt_name: str | None = None,
        prompt: str | None = None,
    ) -> list[int] | None:
        """How many tokens the model's own tokenizer makes of each embedded string (the
        normalized text with the prompt in front, special tokens left out): what an API
        bills. ``prompt`` is the prompt's literal text, in place of ``prompt_name``'s.
        ``None`` when the model's engine has no tokenizer. Loads the model, once.

        Raises:
            InvalidInputError: a text is empty or not a string, or no such prompt.
            ProviderError: the model cannot be loaded here.
        """
        validate_texts(list(texts))
        spec = self.model_spec(model)
        prefix = prompt if prompt is not None else spec.prompt(prompt_name)
        norm = normalizer(self.normalize)
        engine = self.pipeline.engine(spec)
        return engine.count_tokens(spec, [prefix + norm(text) for text in texts])

    def model_spec(
        self,
        model: str | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        dimensions: int | None = None,
    ) -> ModelSpec:
        """The identity of a model name as this cache resolves it (its own model by
        default): an ``openai:`` model at ``base_url`` with ``api_key`` (this cache's by
        default), ``dimensions`` asked of the API; see `embeddingcache.models`.

        Raises:
            InvalidInputError: a malformed name or base URL.
        """
        settings = self.pipeline.settings
        return resolve_model(
            model if model is not None else self.model,
            base_url=base_url if base_url is not None else settings.base_url,
            api_key=api_key if api_key is not None else settings.api_key,
            dimensions=dimensions,
        )

    def _spec(self, model: str | None) -> ModelSpec:
        return self.model_spec(model)

    @property
    def stats(self) -> dict[str, int]:
        """Counts over distinct texts per call, in this process: ``hits``, ``misses`` (not
        in the local cache), ``remote_hits`` (found by the backend), ``computed`` (by this
        machine), ``remote_computed`` (by the backend, for this cache), ``waited`` (computed
        by another call or process sharing the store while this one waited for them),
        ``pushed`` (accepted by the backend) and ``not_stored`` (returned but not stored: the
        cache could not be written, a full disk say); ``tokens_computed``, what the
        computed vectors cost in tokens, and ``tokens_saved``, the recorded cost of the hits:
        tokens not paid for again. Only an engine that bills by the token (an API's) has its
        tokens counted, exactly or as an estimate; see docs/storage.md, "What the cache
        saved". Per model and across runs: `contents` (``ShardSummary.tokens_saved``)."""
        return self.pipeline.stats

    def close(self) -> None:
        """Release database connections and loaded models."""
        travel.forget(self)
        self._flush_when_dropped.detach()
        self.pipeline.close()
        self._store.close()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmbeddingCache(model={self.model!r}, storage={self._store.layout.describe()!r})"

    @property
    def config(self) -> travel.Config:
        """What this cache pickles as: its configuration, the credentials it took from the
        environment by reference (see `embeddingcache.travel`)."""
        api_key = self.pipeline.settings.api_key
        return travel.config_of(self, from_env=self._from_env, api_key=api_key)

    def __reduce__(self) -> tuple[object, ...]:
        return travel.reopen, (EmbeddingCache, self.config)

    def __dask_tokenize__(self) -> object:
        return travel.token_of(self.config)


def _chunks(
    get: Callable[..., np.ndarray],
    texts: Iterator[str],
    model: str | None,
    chunk_size: int,
    total: int | None,
    options: dict[str, Any],
) -> Iterator[np.ndarray]:
    """`iter_embeddings`' arrays: ``get`` (`EmbeddingCache._get`) of each chunk in turn,
    under one progress bar; an error names the index in the whole input."""
    done = 0
    shown = bool(options.pop("show_progress", False))
    with Progress(total, enabled=shown) as progress:
        while chunk := list(itertools.islice(texts, chunk_size)):
            validate_texts(chunk, offset=done)
            try:
                vectors = get(chunk, model, progress, **options)
            except TextTooLongError as exc:
                raise exc.at(done + exc.index) from None
            done += len(chunk)
            yield vectors


def _missing(pipeline: Pipeline, checked: Checked, texts: Iterator[str]) -> list[str]:
    """`EmbeddingCache.missing`, a chunk of ``CHUNK_TEXTS`` texts at a time."""
    found: list[str] = []
    seen: set[bytes] = set()  # the keys of what is missing, across chunks
    done = 0
    while chunk := list(itertools.islice(texts, CHUNK_TEXTS)):
        items, _ = validate_texts(chunk, offset=done)
        call = pipeline.prepare(checked.spec, list(map(checked.normalize, items)), checked.prefix)
        absent = pipeline.absent(call)
        for key, u in zip(call.distinct_keys(absent), absent, strict=True):
            if key not in seen:
                seen.add(key)
                found.append(items[call.firsts[u]])
        done += len(chunk)
    return found


# The arguments of __init__ and prune, checked before anything is opened or removed.


def _checked_providers(providers: Sequence[str]) -> tuple[str, ...]:
    unknown = [p for p in providers if p not in PROVIDERS]
    if isinstance(providers, str) or unknown:
        raise InvalidInputError(
            f"unknown fallback provider(s) {unknown or providers!r}; "
            f"choose from {', '.join(PROVIDERS)}"
        )
    return tuple(providers)


def _checked_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise InvalidInputError(f"timeout must be a positive number of seconds, not {timeout!r}")
    return float(timeout)


def _checked_max_size(max_size: int | None, db_url: str | None) -> int | None:
    if max_size is not None:
        positive_int(max_size, "max_size")
        if db_url is not None:
            raise InvalidInputError(
                "max_size needs a SQLite cache directory; a shared database is pruned "
                "by whoever runs it (embeddingcache prune --older-than / --model)"
            )
    return max_size


def _checked_base_url(base_url: str | None) -> str | None:
    if base_url is not None:
        try:
            endpoint_of(base_url)  # fail now on a URL no request could go to
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None
    return base_url
