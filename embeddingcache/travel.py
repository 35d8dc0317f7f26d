"""A cache that travels: what of an `EmbeddingCache` crosses a process boundary, and how it
opens again where it lands (a Ray actor, a Dask worker, a ``multiprocessing`` child).

A cache pickles as its configuration, a `Config`: the model, where the store is, the backend,
the options. No connection, model, thread or lock is pickled; the copy opens its store and
loads its model on first use, in its own process, as a new cache would.

Credentials travel by reference. A key, token or database URL the cache took from the
environment is read from the environment where it lands, and only there: a database URL is
then checked against the one the sender used (its password left out), so that a worker
never writes to another store than its driver. One given as an argument travels as the
argument did, since nothing else could give it to the worker.

Every copy of one configuration unpickled in one process is one cache, opened once: a worker
that receives it with each of a thousand tasks opens the store and loads the model once. It
stays open there until closed.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .config import ENV_DB_URL
from .credentials import mask
from .errors import InvalidInputError
from .models import ENV_OPENAI_BASE_URL
from .storage.layout import shown_url

__all__ = [
    "Config",
    "Travelling",
    "close_all",
    "config_of",
    "forget",
    "reopen",
    "token_of",
]


class Travelling(Protocol):
    """What `config_of` reads of a cache (an `EmbeddingCache`)."""

    model: str
    cache_dir: Path
    db_url: str | None
    remote_url: str | None
    fallback_providers: tuple[str, ...]
    normalize: str
    timeout: float
    token: str | None
    push: bool
    batch_size: int
    device: str | None
    max_size: int | None
    base_url: str | None
    memory_size: int


@dataclass(frozen=True, repr=False)
class Config:
    """The arguments that open a cache like the one pickled. The secrets are left out of
    the repr, and of `public`."""

    model: str
    cache_dir: str
    remote_url: str | None
    fallback_providers: tuple[str, ...]
    normalize: str
    timeout: float
    push: bool
    batch_size: int
    device: str | None
    max_size: int | None
    base_url: str | None
    memory_size: int
    db_url_shown: str | None
    """The store's database URL without its password; ``None``: the SQLite folder."""
    db_url_from_env: bool
    """Whether the database URL is ``EMBEDDING_CACHE_DB_URL``'s, read where the cache lands."""
    db_url: str | None = field(default=None, repr=False)
    """The database URL given as an argument, password and all; ``None`` otherwise."""
    token: str | None = field(default=None, repr=False)
    api_key: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        # The backend's and the endpoint's URLs may hold userinfo: shown masked.
        fields = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.repr
        )
        return mask(f"Config({fields})")

    def public(self) -> tuple[object, ...]:
        """The configuration without its secrets: what tells two caches apart (Dask's
        token). The secrets choose no vector: the same model at the same place gives the
        same vectors, whoever pays for them."""
        return (
            self.model,
            self.cache_dir,
            self.remote_url,
            self.fallback_providers,
            self.normalize,
            self.timeout,
            self.push,
            self.batch_size,
            self.device,
            self.max_size,
            self.base_url,
            self.memory_size,
            self.db_url_shown,
        )

    def arguments(self) -> dict[str, Any]:
        """``EmbeddingCache``'s keyword arguments, here.

        Raises:
            InvalidInputError: the store was ``EMBEDDING_CACHE_DB_URL``'s, and this process
                sets none, or another.
        """
        if self.db_url_from_env:
            _check_env_db_url(self.db_url_shown)
        return {
            "model": self.model,
            "cache_dir": self.cache_dir,
            # "" rather than None: no database here either, whatever this environment says.
            "db_url": None if self.db_url_from_env else (self.db_url or ""),
            "remote_url": self.remote_url or False,
            "fallback_providers": self.fallback_providers,
            "normalize": self.normalize,
            "timeout": self.timeout,
            "token": self.token,
            "push": self.push,
            "batch_size": self.batch_size,
            "device": self.device,
            "max_size": self.max_size,
            "base_url": self.base_url,
            "api_key": self.api_key,
            "memory_size": self.memory_size,
        }


def config_of(cache: Travelling, *, from_env: frozenset[str], api_key: str | None) -> Config:
    """The configuration ``cache`` travels as; ``from_env`` names its settings that it took
    from the environment (``db_url``, ``token``), ``api_key`` is the key it was given."""
    db_from_env = "db_url" in from_env and cache.db_url is not None
    return Config(
        model=cache.model,
        cache_dir=str(cache.cache_dir),
        remote_url=cache.remote_url,
        fallback_providers=tuple(cache.fallback_providers),
        normalize=cache.normalize,
        timeout=cache.timeout,
        push=cache.push,
        batch_size=cache.batch_size,
        device=cache.device,
        max_size=cache.max_size,
        # Where an `openai:` model computes is part of its shard's identity: the worker
        # computes where the driver would, whatever its own environment says.
        base_url=cache.base_url or os.environ.get(ENV_OPENAI_BASE_URL) or None,
        memory_size=cache.memory_size,
        db_url_shown=shown_url(cache.db_url) if cache.db_url is not None else None,
        db_url_from_env=db_from_env,
        db_url=None if db_from_env else cache.db_url,
        token=None if "token" in from_env else cache.token,
        api_key=api_key,
    )


def token_of(config: Config) -> tuple[object, ...]:
    """A deterministic token for Dask (``__dask_tokenize__``): equal for caches that open
    the same store the same way."""
    return ("embeddingcache.EmbeddingCache", config.public())


C = TypeVar("C")

# The caches opened here from a pickle, by configuration: one per configuration, kept open.
_OPEN: dict[tuple[Callable[..., Any], Config], Any] = {}
_OPEN_LOCK = threading.Lock()


def reopen(factory: Callable[..., C], config: Config) -> C:
    """The cache ``config`` describes, as ``factory`` (`EmbeddingCache`) opens it: the one
    this process already opened from the same configuration, if any. Unpickling calls it.

    Raises:
        InvalidInputError: as `Config.arguments`.
    """
    key = (factory, config)
    with _OPEN_LOCK:
        cache = _OPEN.get(key)
        if cache is None:
            cache = _OPEN[key] = factory(**config.arguments())
    opened: C = cache
    return opened


def forget(cache: object) -> None:
    """Stop handing out ``cache`` to what is unpickled next (it is being closed)."""
    with _OPEN_LOCK:
        for key in [key for key, value in _OPEN.items() if value is cache]:
            del _OPEN[key]


def close_all() -> None:
    """Close every cache opened here from a pickle (tests, and after a fork)."""
    with _OPEN_LOCK:
        caches = list(_OPEN.values())
        _OPEN.clear()
    for cache in caches:
        cache.close()


def _check_env_db_url(expected: str | None) -> None:
    here = os.environ.get(ENV_DB_URL) or None
    if here is None or shown_url(here) != expected:
        found = "sets none" if here is None else f"sets {shown_url(here)}"
        raise InvalidInputError(
            f"this cache was pickled with its store at ${ENV_DB_URL} ({expected}), and this "
            f"process {found}: set the same variable where the cache is unpickled (Ray: "
            "ray.init(runtime_env={'env_vars': {...}}); Dask: the workers' environment), or "
            "pass db_url= to EmbeddingCache"
        )
