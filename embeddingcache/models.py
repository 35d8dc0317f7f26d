"""The model catalog: what identifies a model (its name, engine, prompts, dimension).

The one place where a model name becomes a provider and an identity (`resolve_model`):

- ``openai:MODEL`` is ``MODEL`` behind an OpenAI-compatible ``POST {base_url}/embeddings``
  (engine ``"openai"``). Its shard name holds everything that changes its vectors: the model,
  the endpoint (scheme, host, port and path of ``base_url``, without its query) unless it is
  OpenAI's own, and OpenAI's ``dimensions`` when asked:
  ``openai:text-embedding-3-small``, ``openai:nomic-embed-text;endpoint=http://127.0.0.1:11434/v1``,
  ``openai:text-embedding-3-large;dimensions=256``. The same model name at two endpoints is
  two shards. How the model is reached (the base URL as given, the key) is the spec's
  `Access`, which is no part of its identity and never shown. A ``base_url`` holding
  credentials (``user:key@host``) is refused: the key goes in ``api_key``, sent in a header
  (httpx would send the URL's as Basic auth, in place of the key, and log them).
- A catalog name, in any spelling of it.
- Any other name is used as it is: a Hugging Face id, or a local model folder (resolved to an
  absolute path, so that ``./model`` run from two folders never shares a shard).
"""

from __future__ import annotations

import functools
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .credentials import clean, mask
from .errors import InvalidInputError

__all__ = [
    "CATALOG",
    "DEFAULT_MODEL",
    "ENV_OPENAI_API_KEY",
    "ENV_OPENAI_BASE_URL",
    "OPENAI_BASE_URL",
    "Access",
    "ModelSpec",
    "endpoint_of",
    "resolve_api_key",
    "resolve_model",
]

DEFAULT_MODEL = "nomic-embed-text-v2"
# Where sentence-transformers keeps a saved model's prompts.
ST_CONFIG = "config_sentence_transformers.json"


SENTENCE_TRANSFORMERS = "sentence-transformers"
OPENAI = "openai"
OPENAI_PREFIX = "openai:"
OPENAI_BASE_URL = "https://api.openai.com/v1"
ENV_OPENAI_BASE_URL = "OPENAI_BASE_URL"
ENV_OPENAI_API_KEY = "OPENAI_API_KEY"


def endpoint_of(base_url: str) -> str:
    """The part of a base URL that names where vectors come from: scheme, host, port and path,
    without query or fragment, and without a trailing slash.

    Raises:
        ValueError: not an http(s) URL with a host, or one holding credentials (what the
            message shows of the URL leaves them and the query out).
    """
    parts = urlsplit(base_url.strip())
    # Never the URL as given: it may carry a key (user:key@host, ?api-key=...).
    shown = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"base_url must be an http(s) URL with a host, not {shown!r} "
            "(credentials and query not shown)"
        )
    if "@" in parts.netloc:
        raise ValueError(
            f"base_url {shown!r} holds credentials (user:key@ before the host, not shown): "
            "give the key as api_key= (or OPENAI_API_KEY), sent as a Bearer header, and the "
            "URL without them"
        )
    host = parts.hostname
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


_OPENAI_ENDPOINT = endpoint_of(OPENAI_BASE_URL)


@dataclass(frozen=True, repr=False)
class Access:
    """How this process reaches a model behind an API: the base URL as given (it may hold a
    query an Azure deployment needs) and the API key. Neither is identity, and neither is
    ever shown: the repr names the endpoint only."""

    base_url: str
    api_key: str | None = None

    def __repr__(self) -> str:
        return f"Access({endpoint_of(self.base_url)!r})"


@dataclass(frozen=True)
class ModelSpec:
    """A model's identity: what the cache knows about it before loading it.

    ``name`` names the shard and is written in its sanity table. ``engine`` is the kind of
    engine that computes its vectors (`embeddingcache.engines.REGISTRY`); how that engine
    loads or reaches the model is the engine's business. ``prompts`` maps prompt names to
    the prefix the model expects; ``default_prompt`` is the one applied when the caller names
    none. ``options`` holds what changes the vectors beyond the name (an API model's
    ``model`` name, ``endpoint`` and ``dimensions``); ``aliases`` the other names that mean
    this model. ``access`` says how an API model is reached (`Access`): not compared, not
    shown, not stored.
    """

    name: str
    engine: str = SENTENCE_TRANSFORMERS
    prompts: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    default_prompt: str | None = None
    dimension: int | None = None
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    aliases: tuple[str, ...] = ()
    access: Access | None = field(default=None, repr=False, compare=False)

    def prompt(self, prompt_name: str | None) -> str:
        """The prefix for ``prompt_name`` (the default one when ``None``)."""
        name = prompt_name if prompt_name is not None else self.default_prompt
        if name is None:
            return ""
        try:
            return self.prompts[name]
        except KeyError:
            known = ", ".join(sorted(self.prompts)) or "none"
            raise InvalidInputError(
                f"model {self.name!r} has no prompt {name!r}; its prompts: {known}"
            ) from None


_NOMIC_PROMPTS = MappingProxyType({"document": "search_document: ", "query": "search_query: "})

CATALOG: Mapping[str, ModelSpec] = MappingProxyType(
    {
        "nomic-embed-text-v2": ModelSpec(
            name="nomic-embed-text-v2",
            prompts=_NOMIC_PROMPTS,
            default_prompt="document",
            dimension=768,
            aliases=("nomic-ai/nomic-embed-text-v2-moe",),
        ),
        "all-MiniLM-L6-v2": ModelSpec(
            name="all-MiniLM-L6-v2",
            dimension=384,
            aliases=("sentence-transformers/all-MiniLM-L6-v2",),
        ),
    }
)

# Every spelling of a catalog model, in lower case, so that all of them share its shard.
_BY_LOWER_NAME = {
    **{name.lower(): name for name in CATALOG},
    **{alias.lower(): name for name, spec in CATALOG.items() for alias in spec.aliases},
}


def catalog_name(model: str) -> str | None:
    """The catalog entry a name refers to, in any letter case, or ``None``."""
    return _BY_LOWER_NAME.get(model.lower())


def resolve_api_key(api_key: str | None) -> str | None:
    """The key of API models: ``api_key``, else ``OPENAI_API_KEY``, without its outer
    whitespace (`embeddingcache.credentials.clean`); ``None``: no key.

    Raises:
        InvalidInputError: a character an HTTP header cannot carry is left in the key.
    """
    if api_key is not None:
        return clean(api_key, "api_key")
    return clean(os.environ.get(ENV_OPENAI_API_KEY) or None, f"${ENV_OPENAI_API_KEY}")


def resolve_model(
    model: str,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    dimensions: int | None = None,
) -> ModelSpec:
    """The spec for a model name: an API model (``openai:MODEL``), a catalog entry, a local
    folder, or a Hub id.

    ``base_url``, ``api_key`` and ``dimensions`` concern API models only (a local model's
    ``dimensions`` is applied on read, by the caller): ``base_url`` defaults to
    ``OPENAI_BASE_URL``, else OpenAI's; ``api_key`` to ``OPENAI_API_KEY``; ``dimensions`` is
    sent to the API as OpenAI's ``dimensions`` and is part of the identity.

    Raises:
        InvalidInputError: an empty name, a malformed ``openai:`` name, a ``base_url`` that
            is not an http(s) URL, holds credentials, or contradicts the endpoint the name
            holds, or a key a header cannot carry. No message shows a key, nor a URL's
            credentials or query.
    """
    if not isinstance(model, str) or not model.strip():
        raise InvalidInputError(f"model must be a non-empty str, not {model!r}")
    if model.startswith(OPENAI_PREFIX):
        return _api_spec(model, base_url, api_key, dimensions)
    name = catalog_name(model)
    if name is not None:
        return CATALOG[name]
    folder = _folder_spec(model)
    return folder if folder is not None else ModelSpec(name=model)


# A local folder's spec by the name it was given, with what it was resolved from: the
# directory's identity and its config's stamp. Resolving a path stats each of its parts, most
# of a cached text's time (65 -> ~25 us); two stats tell whether the answer still holds.
_FOLDERS: dict[str, tuple[tuple[int, int], tuple[int, int] | None, ModelSpec]] = {}
_FOLDERS_KEPT = 64


def _folder_spec(model: str) -> ModelSpec | None:
    """The spec of the local model folder ``model`` names, ``None`` when it names none.

    The name is resolved again whenever the directory it reaches is another one (a symlink
    re-pointed, a relative name from another working directory) or its config changed."""
    path = os.path.expanduser(model)
    try:
        found = os.stat(path)
    except (OSError, ValueError):
        return None
    if not stat.S_ISDIR(found.st_mode):
        return None
    try:
        config = os.stat(os.path.join(path, ST_CONFIG))
        stamp: tuple[int, int] | None = (config.st_mtime_ns, config.st_size)
    except OSError:
        stamp = None
    identity = (found.st_dev, found.st_ino)
    known = _FOLDERS.get(model)
    if known is not None and known[0] == identity and known[1] == stamp:
        return known[2]
    spec = _local_spec(str(Path(path).resolve()), stamp)
    if len(_FOLDERS) >= _FOLDERS_KEPT:
        _FOLDERS.clear()
    _FOLDERS[model] = (identity, stamp, spec)
    return spec


@functools.lru_cache(maxsize=64)
def _local_spec(folder: str, stamp: tuple[int, int] | None) -> ModelSpec:
    """A local model folder's spec, with the prompts its sentence-transformers config names
    (read again when the config file changes, ``stamp``): the cache then embeds what
    ``model.encode`` would."""
    prompts: dict[str, str] = {}
    default: str | None = None
    try:
        config = json.loads((Path(folder) / ST_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    if isinstance(config, dict):
        found = config.get("prompts")
        if isinstance(found, dict):
            prompts = {k: v for k, v in found.items() if isinstance(k, str) and isinstance(v, str)}
        named = config.get("default_prompt_name")
        default = named if isinstance(named, str) and named in prompts else None
    return ModelSpec(name=folder, prompts=MappingProxyType(prompts), default_prompt=default)


# openai:MODEL[;endpoint=URL][;dimensions=N], the shard name of an API model.
_API_NAME = re.compile(
    r"openai:(?P<model>[^;]+?)(?:;endpoint=(?P<endpoint>[^;]+))?(?:;dimensions=(?P<dim>[0-9]+))?"
)


def _api_spec(
    model: str, base_url: str | None, api_key: str | None, dimensions: int | None
) -> ModelSpec:
    """The spec of ``openai:MODEL``, named by `api_name` from what the name holds and what
    the caller gives (the two must agree)."""
    # The name as messages show it: an endpoint in it may hold credentials or a query.
    shown = mask(model)
    found = _API_NAME.fullmatch(model)
    if found is None or not found["model"].strip():
        raise InvalidInputError(
            f"model {shown!r}: an API model is named openai:MODEL, optionally followed by "
            ";endpoint=URL and ;dimensions=N"
        )
    named_endpoint, named_dim = found["endpoint"], found["dim"]
    url = base_url if base_url is not None else os.environ.get(ENV_OPENAI_BASE_URL) or None
    try:
        endpoint = endpoint_of(url) if url is not None else None
        if named_endpoint is not None and endpoint_of(named_endpoint) != named_endpoint:
            raise ValueError(f"the endpoint {mask(named_endpoint)!r} is not in its canonical form")
    except ValueError as exc:
        raise InvalidInputError(f"model {shown!r}: {exc}") from None
    if named_endpoint is not None:
        if base_url is not None and endpoint != named_endpoint:
            raise InvalidInputError(
                f"model {shown!r} is at {named_endpoint}, and base_url is {endpoint}"
            )
        if endpoint != named_endpoint:
            url, endpoint = named_endpoint, named_endpoint  # the name says where
    if endpoint is None:
        url, endpoint = OPENAI_BASE_URL, _OPENAI_ENDPOINT
    if ";" in endpoint:
        raise InvalidInputError(f"base_url {endpoint!r}: an endpoint may not contain ';'")
    if named_dim is not None:
        if dimensions is not None and dimensions != int(named_dim):
            raise InvalidInputError(
                f"model {shown!r} has dimensions={named_dim}, and dimensions={dimensions} was asked"
            )
        dimensions = int(named_dim)
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
    ):
        raise InvalidInputError(f"dimensions must be a positive int, not {dimensions!r}")
    name = api_name(found["model"], endpoint, dimensions)
    options: dict[str, Any] = {"model": found["model"], "endpoint": endpoint}
    if dimensions is not None:
        options["dimensions"] = dimensions
    assert url is not None
    return ModelSpec(
        name=name,
        engine=OPENAI,
        dimension=dimensions,
        options=MappingProxyType(options),
        access=Access(url, resolve_api_key(api_key)),
    )


def api_name(model: str, endpoint: str, dimensions: int | None = None) -> str:
    """The shard name of an API model: ``openai:MODEL``, then ``;endpoint=...`` unless it is
    OpenAI's, then ``;dimensions=N`` when asked."""
    name = OPENAI_PREFIX + model
    if endpoint != _OPENAI_ENDPOINT:
        name += f";endpoint={endpoint}"
    if dimensions is not None:
        name += f";dimensions={dimensions}"
    return name
