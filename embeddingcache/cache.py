"""EmbeddingCache: validate, normalize, key, look up, compute what is missing, store, return."""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import numpy as np

from .config import resolve_cache_dir, resolve_db_url, resolve_model_name, resolve_remote_url
from .errors import (
    AllProvidersFailedError,
    EmbeddingCacheWarning,
    InvalidInputError,
    ProviderError,
    TextTooLongError,
)
from .keys import keys_of, normalizer, validate_texts
from .models import ModelSpec, resolve_model
from .providers import Provider
from .storage import ShardSummary, Store, layout_for

__all__ = ["EmbeddingCache"]

logger = logging.getLogger("embeddingcache")

PROVIDERS = ("local", "remote")
DTYPES: dict[str, type[np.floating[Any]]] = {"float32": np.float32, "float64": np.float64}
# Rows per write transaction: big enough to amortize the commit, small enough that a writer
# holds the SQLite lock for a short while only.
WRITE_BATCH = 2000

Dtype = Literal["float32", "float64"]


@dataclass(frozen=True)
class CacheContents:
    """What :meth:`EmbeddingCache.contents` reports."""

    location: str
    texts: int
    shards: list[ShardSummary]


class EmbeddingCache:
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
        timeout: seconds to wait for the remote backend.
        batch_size: texts per forward pass of the local model.
        device: ``"cpu"``, ``"cuda"``, ``"mps"``...; default: the best one available.

    Raises:
        InvalidInputError: an unknown provider or normalization policy.
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
        batch_size: int = 32,
        device: str | None = None,
    ) -> None:
        self.model = resolve_model_name(model)
        self.cache_dir = resolve_cache_dir(cache_dir)
        self.db_url = resolve_db_url(db_url)
        self.remote_url = resolve_remote_url(remote_url)
        unknown = [p for p in fallback_providers if p not in PROVIDERS]
        if isinstance(fallback_providers, str) or unknown:
            raise InvalidInputError(
                f"unknown fallback provider(s) {unknown or fallback_providers!r}; "
                f"choose from {', '.join(PROVIDERS)}"
            )
        self.fallback_providers = tuple(fallback_providers)
        normalizer(normalize)  # fail now on an unknown policy
        self.normalize = normalize
        self.timeout = timeout
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.device = device
        self._store = Store(layout_for(self.cache_dir, self.db_url))
        self._providers: dict[str, Provider] = {}
        self._lock = threading.Lock()
        self._stats = {"hits": 0, "misses": 0, "remote_hits": 0, "computed": 0}

    # -- public API -----------------------------------------------------------------------

    def get_embeddings(
        self,
        texts: str | Sequence[str],
        model: str | None = None,
        *,
        normalize: str | None = None,
        batch_size: int | None = None,
        show_progress: bool = False,
        normalize_embeddings: bool = False,
        dtype: Dtype = "float32",
        truncate: bool = False,
        prompt_name: str | None = None,
    ) -> np.ndarray:
        """Embeddings of ``texts``, computed only for what the cache does not hold.

        Returns a ``(dim,)`` array for a ``str`` and an ``(n, dim)`` array, in input order,
        for a sequence. ``normalize_embeddings`` (unit length) and ``dtype`` are applied on
        read: the stored vector is always the model's raw float32 output. ``prompt_name``
        picks one of a catalog model's prompts (``"document"``, the default, or ``"query"``
        for nomic-embed-text-v2).

        Raises:
            InvalidInputError: a text is ``None``, empty or whitespace only (a ``ValueError``).
            InvalidInputTypeError: a text is not a ``str`` (a ``TypeError``).
            TextTooLongError: a text is longer than the model accepts, ``truncate`` false.
            AllProvidersFailedError: vectors were missing and nobody could compute them.
            StorageError: the cache could not be read or written.
        """
        items, single = validate_texts(texts)
        spec = resolve_model(model if model is not None else self.model)
        norm = normalizer(normalize if normalize is not None else self.normalize)
        out_dtype = _dtype(dtype)
        batch = (
            _positive_int(batch_size, "batch_size") if batch_size is not None else self.batch_size
        )
        prompt = spec.prompt(prompt_name)

        normalized = [norm(text) for text in items]
        embedded = [prompt + text for text in normalized] if prompt else normalized
        keys = keys_of(embedded)
        # Deduplicate: each distinct key is looked up, computed and counted once.
        first: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        unique_keys = list(first)
        inverse: np.ndarray | None = None  # None: every key is distinct, in input order
        if len(unique_keys) != len(keys):
            where = {key: u for u, key in enumerate(unique_keys)}
            inverse = np.fromiter((where[key] for key in keys), dtype=np.intp, count=len(keys))

        found = self._store.lookup(spec.name, unique_keys)
        n_missing = len(unique_keys) - len(found.positions)
        self._count(hits=len(found.positions), misses=n_missing)
        if not unique_keys:
            unique = np.empty((0, self._known_dimension(spec)), dtype=np.float32)
        elif not n_missing:
            unique = np.empty_like(found.vectors)
            unique[found.positions] = found.vectors
        else:
            missing = np.ones(len(unique_keys), dtype=bool)
            missing[found.positions] = False
            todo = [first[unique_keys[u]] for u in np.flatnonzero(missing)]
            computed = self._compute(
                spec,
                [normalized[i] for i in todo],
                origins=todo,
                prompt=prompt,
                batch_size=batch,
                show_progress=show_progress,
                truncate=truncate,
            )
            damaged = {unique_keys[u] for u in found.damaged}
            if damaged:
                message = (
                    f"{len(damaged)} stored vector(s) of model {spec.name!r} had the wrong "
                    "length; recomputed and replaced them"
                )
                logger.warning(message)
                warnings.warn(message, EmbeddingCacheWarning, stacklevel=2)
            self._store_rows(
                spec, [keys[i] for i in todo], [embedded[i] for i in todo], computed, damaged
            )
            unique = np.empty((len(unique_keys), computed.shape[1]), dtype=np.float32)
            unique[missing] = computed
            if len(found.positions):
                unique[found.positions] = found.vectors

        result = unique if inverse is None else unique[inverse]
        if normalize_embeddings:
            norms = np.linalg.norm(result, axis=1, keepdims=True)
            np.divide(result, norms, out=result, where=norms > 0)
        if out_dtype is not np.float32:
            result = result.astype(out_dtype)
        return result[0] if single else result

    def embed(
        self, text_or_texts: str | Sequence[str], model: str | None = None, **options: Any
    ) -> list[float] | list[list[float]]:
        """Like :meth:`get_embeddings`, as Python floats: a list for a ``str``, a list of
        lists for a sequence."""
        vectors: list[float] | list[list[float]] = self.get_embeddings(
            text_or_texts, model, **options
        ).tolist()
        return vectors

    def migrate(self) -> list[str]:
        """Bring the stored tables to this version's schema (opening them does it too).

        Returns the names of the places (files or schemas) found and now current.
        """
        return self._store.migrate()

    def contents(self) -> CacheContents:
        """What the storage holds: its location, the number of texts, and each model shard."""
        return CacheContents(
            location=self._store.layout.describe(),
            texts=self._store.text_count(),
            shards=self._store.summaries(),
        )

    @property
    def stats(self) -> dict[str, int]:
        """Counts over distinct texts per call: ``hits``, ``misses`` (not in the local cache),
        ``remote_hits`` (found by the backend) and ``computed``."""
        with self._lock:
            return dict(self._stats)

    def close(self) -> None:
        """Release database connections and loaded models."""
        with self._lock:
            providers, self._providers = list(self._providers.values()), {}
        for provider in providers:
            provider.close()
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

    # -- the miss path --------------------------------------------------------------------

    def _compute(
        self,
        spec: ModelSpec,
        texts: list[str],
        *,
        origins: list[int],
        prompt: str,
        batch_size: int,
        show_progress: bool,
        truncate: bool,
    ) -> np.ndarray:
        tried: list[str] = []
        for name in self.fallback_providers:
            provider = self._provider(name)
            if provider is None:
                tried.append(f"{name} (not configured)")
                continue
            try:
                vectors = provider.compute(
                    spec,
                    texts,
                    prompt=prompt,
                    batch_size=batch_size,
                    show_progress=show_progress,
                    truncate=truncate,
                )
            except TextTooLongError as exc:
                raise TextTooLongError(exc.detail, index=origins[exc.index]) from None
            except ProviderError as exc:
                logger.debug("provider %s failed: %s", name, exc)
                tried.append(f"{name} ({exc})")
                continue
            self._count(computed=len(texts))
            return vectors
        raise AllProvidersFailedError(
            f"cannot compute embeddings for model {spec.name!r}; tried: {'; '.join(tried)}. "
            "Install embeddingcache[local] to compute them here, or set remote_url "
            "(EMBEDDING_CACHE_URL) to a running `embeddingcache serve` backend."
        )

    def _store_rows(
        self,
        spec: ModelSpec,
        keys: list[bytes],
        texts: list[str],
        vectors: np.ndarray,
        damaged: set[bytes],
    ) -> None:
        for start in range(0, len(keys), WRITE_BATCH):
            chunk = keys[start : start + WRITE_BATCH]
            self._store.put(
                spec.name,
                chunk,
                texts[start : start + WRITE_BATCH],
                vectors[start : start + WRITE_BATCH],
                replace=[key for key in chunk if key in damaged],
            )

    def _provider(self, name: str) -> Provider | None:
        with self._lock:
            provider = self._providers.get(name)
            if provider is None and name == "local":
                from .providers.local import LocalProvider

                provider = self._providers[name] = LocalProvider(device=self.device)
            return provider

    def _known_dimension(self, spec: ModelSpec) -> int:
        info = self._store.info(spec.name)
        if info is not None:
            return info.dimension
        return spec.dimension or 0

    def _count(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                self._stats[name] += amount


def _dtype(dtype: str) -> type[np.floating[Any]]:
    try:
        return DTYPES[dtype]
    except (KeyError, TypeError):
        raise InvalidInputError(
            f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}"
        ) from None


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be a positive int, not {value!r}")
    return value
