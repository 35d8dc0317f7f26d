"""Settings: an argument wins, then the environment, then the default."""

from __future__ import annotations

import os
from pathlib import Path

from .credentials import clean
from .errors import InvalidInputError
from .models import DEFAULT_MODEL
from .storage.memory import DEFAULT_MEMORY_SIZE

__all__ = [
    "DEFAULT_CACHE_DIR",
    "ENV_CACHE_DIR",
    "ENV_DB_URL",
    "ENV_MEMORY_SIZE",
    "ENV_MODEL",
    "ENV_PRICE_PER_MILLION",
    "ENV_REMOTE_URL",
    "ENV_TOKEN",
    "resolve_cache_dir",
    "resolve_db_url",
    "resolve_memory_size",
    "resolve_model_name",
    "resolve_price_per_million",
    "resolve_remote_url",
    "resolve_token",
]

ENV_CACHE_DIR = "EMBEDDING_CACHE_DIR"
ENV_DB_URL = "EMBEDDING_CACHE_DB_URL"
ENV_REMOTE_URL = "EMBEDDING_CACHE_URL"
ENV_MODEL = "EMBEDDING_CACHE_MODEL"
ENV_TOKEN = "EMBEDDING_CACHE_TOKEN"
ENV_PRICE_PER_MILLION = "EMBEDDING_CACHE_PRICE_PER_MILLION"
ENV_MEMORY_SIZE = "EMBEDDING_CACHE_MEMORY_SIZE"
DEFAULT_CACHE_DIR = "~/.cache/embedding-cache"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    chosen = (
        cache_dir if cache_dir is not None else os.environ.get(ENV_CACHE_DIR) or DEFAULT_CACHE_DIR
    )
    return Path(chosen).expanduser().absolute()


def resolve_db_url(db_url: str | None) -> str | None:
    """``None`` reads the environment; ``""`` means the SQLite folder, whatever it says."""
    return (db_url or None) if db_url is not None else os.environ.get(ENV_DB_URL) or None


def resolve_remote_url(remote_url: str | bool | None) -> str | None:
    """``None`` reads the environment; ``False`` or ``""`` turns the backend off."""
    if remote_url is False or remote_url == "":
        return None
    if isinstance(remote_url, str):
        return remote_url.rstrip("/")
    from_env = os.environ.get(ENV_REMOTE_URL)
    return from_env.rstrip("/") if from_env else None


def resolve_model_name(model: str | None) -> str:
    return model if model is not None else os.environ.get(ENV_MODEL) or DEFAULT_MODEL


def resolve_token(token: str | None) -> str | None:
    """The backend's bearer token, without its outer whitespace (`credentials.clean`).

    Raises:
        InvalidInputError: a character an HTTP header cannot carry is left in it.
    """
    if token is not None:
        return clean(token, "token")
    return clean(os.environ.get(ENV_TOKEN) or None, f"${ENV_TOKEN}")


def resolve_price_per_million(price: float | None) -> float | None:
    """What a million tokens cost, in USD, for the savings report (`embeddingcache stats`);
    ``None``: not priced.

    Raises:
        InvalidInputError: the price (or the environment's) is not a finite number >= 0.
    """
    given: object = price
    if price is None:
        given = os.environ.get(ENV_PRICE_PER_MILLION) or None
        if given is None:
            return None
    try:
        value = float(given)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 <= value < float("inf"):  # NaN fails this too
        where = f"${ENV_PRICE_PER_MILLION}" if price is None else "the price per million tokens"
        raise InvalidInputError(f"{where} must be a number of USD >= 0, not {given!r}")
    return value


def resolve_memory_size(memory_size: int | None) -> int:
    """The bytes of vectors a cache holds in memory (``storage.memory``); 0 turns the tier off.

    Raises:
        InvalidInputError: the size (or the environment's) is not an int >= 0.
    """
    given: object = memory_size
    where = "memory_size"
    if memory_size is None:
        given = (os.environ.get(ENV_MEMORY_SIZE) or "").strip() or DEFAULT_MEMORY_SIZE
        where = f"${ENV_MEMORY_SIZE}"
        if isinstance(given, str) and given.isdigit():
            given = int(given)
    if isinstance(given, bool) or not isinstance(given, int) or given < 0:
        raise InvalidInputError(f"{where} must be a number of bytes >= 0, not {given!r}")
    return given
