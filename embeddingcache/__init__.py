"""embeddingcache: compute each text embedding once, then read it from SQL storage.

>>> from embeddingcache import get_embeddings
>>> vectors = get_embeddings(["hello", "world"], "all-MiniLM-L6-v2")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from . import travel
from ._version import __version__
from .cache import CHUNK_TEXTS, EmbeddingCache
from .config import (
    ENV_CACHE_DIR,
    ENV_DB_URL,
    ENV_REMOTE_URL,
    resolve_cache_dir,
    resolve_db_url,
    resolve_remote_url,
)
from .errors import (
    AllProvidersFailedError,
    BackupError,
    DimensionMismatchError,
    EmbeddingCacheError,
    EmbeddingCacheWarning,
    InvalidInputError,
    InvalidInputTypeError,
    ModelLoadError,
    ProviderError,
    ShardMismatchError,
    StorageError,
    TextTooLongError,
)
from .options import SharedCallOptions
from .reading import Dtype, Output

if TYPE_CHECKING:
    import torch
    from typing_extensions import Unpack

__all__ = [
    "AllProvidersFailedError",
    "BackupError",
    "DimensionMismatchError",
    "EmbeddingCache",
    "EmbeddingCacheError",
    "EmbeddingCacheWarning",
    "InvalidInputError",
    "InvalidInputTypeError",
    "ModelLoadError",
    "ProviderError",
    "ShardMismatchError",
    "StorageError",
    "TextTooLongError",
    "__version__",
    "embed",
    "get_embeddings",
    "iter_embeddings",
]

_caches: dict[tuple[Any, ...], EmbeddingCache] = {}
_by_arguments: dict[tuple[Any, ...], EmbeddingCache] = {}
_caches_lock = threading.Lock()


def _shared_cache(cache_dir: str | os.PathLike[str] | None, db_url: str | None) -> EmbeddingCache:
    """One cache per storage place and backend, reused by every module-level call."""
    # The arguments and the variables as given find the cache without resolving any path:
    # this runs on every call, and a cached hit takes microseconds.
    environ = os.environ
    given = (
        cache_dir,
        db_url,
        environ.get(ENV_CACHE_DIR),
        environ.get(ENV_DB_URL),
        environ.get(ENV_REMOTE_URL),
    )
    cache = _by_arguments.get(given)
    if cache is not None:
        return cache
    key = (resolve_cache_dir(cache_dir), resolve_db_url(db_url), resolve_remote_url(None))
    with _caches_lock:
        cache = _caches.get(key)
        if cache is None:
            cache = _caches[key] = EmbeddingCache(cache_dir=key[0], db_url=key[1])
        _by_arguments[given] = cache
        return cache


# The module functions take the options of the methods they call, and where the cache is
# (cache_dir, db_url); tests/test_public_api.py compares their signatures, so that an option added
# to a method and not here (or the other way round) fails. The overloads take them as
# options.SharedCallOptions, which mypy checks against the implementation.


@overload
def get_embeddings(
    texts: str | Sequence[str],
    model: str | None = None,
    *,
    output: Literal["numpy"] = "numpy",
    **options: Unpack[SharedCallOptions],
) -> np.ndarray: ...


@overload
def get_embeddings(
    texts: str | Sequence[str],
    model: str | None = None,
    *,
    output: Literal["list"],
    **options: Unpack[SharedCallOptions],
) -> list[float] | list[list[float]]: ...


@overload
def get_embeddings(
    texts: str | Sequence[str],
    model: str | None = None,
    *,
    output: Literal["torch"],
    **options: Unpack[SharedCallOptions],
) -> torch.Tensor: ...


def get_embeddings(
    texts: str | Sequence[str],
    model: str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    db_url: str | None = None,
    normalize: str = "strip",
    batch_size: int = 32,
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
    """Embeddings of ``texts``: ``(n, dim)`` for a sequence, ``(dim,)`` for one ``str``.

    Each distinct text is computed once per model, ever; later calls read it from the cache.
    `EmbeddingCache.get_embeddings` of the process-wide cache of ``cache_dir`` or ``db_url``:
    see it for the options and the errors raised. ``get_embeddings(texts,
    "openai:text-embedding-3-small")`` computes misses with OpenAI's API (``api_key=`` or
    ``OPENAI_API_KEY``); ``base_url=`` points it at any OpenAI-compatible server.
    """
    # Any: the overloads of the method are picked by the literal here, checked above.
    cache: Any = _shared_cache(cache_dir, db_url)
    result: np.ndarray | list[float] | list[list[float]] | torch.Tensor = cache.get_embeddings(
        texts,
        model,
        normalize=normalize,
        batch_size=batch_size,
        show_progress=show_progress,
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
    return result


def embed(
    text_or_texts: str | Sequence[str],
    model: str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    db_url: str | None = None,
    **options: Any,
) -> list[float] | list[list[float]]:
    """The embedding of a ``str`` as a list of floats, or of a sequence as a list of lists:
    `EmbeddingCache.embed` of the process-wide cache of ``cache_dir`` or ``db_url``."""
    return _shared_cache(cache_dir, db_url).embed(text_or_texts, model, **options)


def iter_embeddings(
    texts: Iterable[str],
    model: str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    db_url: str | None = None,
    chunk_size: int = CHUNK_TEXTS,
    **options: Any,
) -> Iterator[np.ndarray]:
    """Embeddings of any iterable of texts, ``(n, dim)`` arrays one chunk at a time, stored
    as they go: `EmbeddingCache.iter_embeddings` of the process-wide cache of ``cache_dir``
    or ``db_url``."""
    return _shared_cache(cache_dir, db_url).iter_embeddings(
        texts, model, chunk_size=chunk_size, **options
    )


def _reset_shared_caches() -> None:
    """Close the caches the module functions share (tests, and after a fork)."""
    with _caches_lock:
        caches = list(_caches.values())
        _caches.clear()
        _by_arguments.clear()
    for cache in caches:
        cache.close()
    travel.close_all()
