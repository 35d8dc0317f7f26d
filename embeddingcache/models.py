"""The model catalog: what identifies a model (its name, engine, prompts, dimension).

A name that is not in the catalog is used as it is: a Hugging Face id, or a local model folder
(resolved to an absolute path, so that ``./model`` run from two folders never shares a shard).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import InvalidInputError

__all__ = ["CATALOG", "DEFAULT_MODEL", "ModelSpec", "resolve_model"]

DEFAULT_MODEL = "nomic-embed-text-v2"
# Where sentence-transformers keeps a saved model's prompts.
ST_CONFIG = "config_sentence_transformers.json"


SENTENCE_TRANSFORMERS = "sentence-transformers"


@dataclass(frozen=True)
class ModelSpec:
    """A model's identity: what the cache knows about it before loading it.

    ``name`` names the shard and is written in its sanity table. ``engine`` is the kind of
    engine that computes its vectors (`embeddingcache.engines.REGISTRY`); how that engine
    loads or reaches the model is the engine's business. ``prompts`` maps prompt names to
    the prefix the model expects; ``default_prompt`` is the one applied when the caller names
    none. ``options`` holds what changes the vectors beyond the name (an API model's
    endpoint, a request option); ``aliases`` the other names that mean this model.
    """

    name: str
    engine: str = SENTENCE_TRANSFORMERS
    prompts: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    default_prompt: str | None = None
    dimension: int | None = None
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    aliases: tuple[str, ...] = ()

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


def resolve_model(model: str) -> ModelSpec:
    """The spec for a model name: a catalog entry, a local folder, or a Hub id."""
    if not isinstance(model, str) or not model.strip():
        raise InvalidInputError(f"model must be a non-empty str, not {model!r}")
    name = catalog_name(model)
    if name is not None:
        return CATALOG[name]
    path = Path(model).expanduser()
    if path.is_dir():
        folder = path.resolve()
        try:
            config = (folder / ST_CONFIG).stat()
            stamp: tuple[int, int] | None = (config.st_mtime_ns, config.st_size)
        except OSError:
            stamp = None
        return _local_spec(str(folder), stamp)
    return ModelSpec(name=model)


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
