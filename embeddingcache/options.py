"""The per-call options of ``get_embeddings``, written once for its overloads.

The overloads of `EmbeddingCache.get_embeddings` and `embeddingcache.get_embeddings` differ
only in ``output`` and in what they return: they take every other option as
``**options: Unpack[CallOptions]`` (``Unpack[SharedCallOptions]`` for the module function),
so that an option is added here once for all six. The implementations still spell each
option out: that is the signature ``inspect``, ``help()`` and the API page show, and
tests/test_public_api.py keeps the method's and the module function's alike.
"""

from __future__ import annotations

import os
from typing import TypedDict

from .reading import Dtype

__all__ = ["CallOptions", "SharedCallOptions"]


class _Options(TypedDict, total=False):
    """The options whose type is the same on the method and the module function."""

    show_progress: bool
    normalize_embeddings: bool
    dimensions: int | None
    dtype: Dtype
    truncate: bool
    prompt_name: str | None
    prompt: str | None
    base_url: str | None
    api_key: str | None


class CallOptions(_Options, total=False):
    """`EmbeddingCache.get_embeddings`' options besides ``output``; ``None`` for
    ``normalize`` or ``batch_size`` is the cache's own setting."""

    normalize: str | None
    batch_size: int | None


class SharedCallOptions(_Options, total=False):
    """`embeddingcache.get_embeddings`' options besides ``output``: the method's, with the
    storage place of the shared cache, and the cache's defaults in place of ``None``."""

    cache_dir: str | os.PathLike[str] | None
    db_url: str | None
    normalize: str
    batch_size: int
