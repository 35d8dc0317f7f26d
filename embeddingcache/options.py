"""The per-call options of ``get_embeddings``: their types, written once for its overloads,
and their check against the cache's settings before any work.

The overloads of `EmbeddingCache.get_embeddings` and `embeddingcache.get_embeddings` differ
only in ``output`` and in what they return: they take every other option as
``**options: Unpack[CallOptions]`` (``Unpack[SharedCallOptions]`` for the module function),
so that an option is added here once for all six. The implementations still spell each
option out: that is the signature ``inspect``, ``help()`` and the API page show, and
tests/test_public_api.py keeps the method's and the module function's alike.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple, Protocol, TypedDict

from ._util import positive_int
from .engines import EmbedOptions
from .errors import InvalidInputError
from .keys import normalizer
from .models import ModelSpec
from .reading import Dtype, Output, ReadOptions, read_options

__all__ = ["CacheSettings", "CallOptions", "Checked", "SharedCallOptions", "check"]


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


class Checked(NamedTuple):
    """A call's options, checked, with the cache's settings filled in where it gave none."""

    spec: ModelSpec
    normalize: Callable[[str], str]
    prefix: str  # the prompt, embedded before each normalized text
    embed: EmbedOptions
    read: ReadOptions


class CacheSettings(Protocol):
    """What `check` reads of the cache (an `EmbeddingCache`): its normalization policy and
    how it resolves a model name. A protocol, so that this module imports nothing of the
    cache that imports it."""

    normalize: str

    def model_spec(
        self,
        model: str | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        dimensions: int | None = None,
    ) -> ModelSpec: ...


def check(
    cache: CacheSettings,
    model: str | None,
    defaults: EmbedOptions,
    progress: bool,
    *,
    output: Output = "numpy",
    normalize: str | None = None,
    batch_size: int | None = None,
    normalize_embeddings: bool = False,
    dimensions: int | None = None,
    dtype: Dtype = "float32",
    truncate: bool = False,
    prompt_name: str | None = None,
    prompt: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
) -> Checked:
    """The options of one `EmbeddingCache.get_embeddings` call (``show_progress`` as
    ``progress``), checked before any work; ``defaults`` are the cache's `EmbedOptions`.
    Spelled out, not ``**options``: a dict and its keys built per call cost a cached text
    a quarter of its time (issue 27). A test keeps them equal to `CallOptions`.

    Raises:
        TypeError: an option ``get_embeddings`` does not take (what Python raises for a
            call that names one: ``iter_embeddings`` passes its ``**options`` on unread).
        InvalidInputError: an unknown output, dtype, normalization policy or prompt, a
            malformed model name or base URL, ``dimensions`` or ``batch_size`` not a positive
            int, or both ``prompt`` and ``prompt_name``.
    """
    reading = read_options(
        dimensions=dimensions,
        normalize_embeddings=normalize_embeddings,
        dtype=dtype,
        output=output,
    )
    spec = cache.model_spec(model, base_url=base_url, api_key=api_key, dimensions=dimensions)
    norm = normalizer(normalize if normalize is not None else cache.normalize)
    if batch_size is None and not progress and not truncate:
        embed = defaults  # the usual call allocates no options of its own
    else:
        embed = EmbedOptions(
            batch_size=positive_int(batch_size, "batch_size")
            if batch_size is not None
            else defaults.batch_size,
            show_progress=progress,
            truncate=truncate,
        )
    prefix = _prompt_prefix(spec, prompt_name, prompt)
    return Checked(spec, norm, prefix, embed, reading)


def _prompt_prefix(spec: ModelSpec, prompt_name: str | None, prompt: str | None) -> str:
    """The prefix embedded before each text: ``prompt`` itself, else the named prompt."""
    if prompt is None:
        return spec.prompt(prompt_name)
    if not isinstance(prompt, str):
        raise InvalidInputError(f"prompt must be a str, not {type(prompt).__name__}")
    if prompt_name is not None:
        raise InvalidInputError(f"pass prompt_name={prompt_name!r} or prompt={prompt!r}, not both")
    return prompt
