"""Engines turn texts into vectors, behind one contract, found through one registry.

A model's `ModelSpec` names its engine kind (``spec.engine``); `create` builds the engine of
a kind from `REGISTRY`. The pipeline only calls the `Engine` methods, so adding an engine is
a module and a `register` call, and no branch anywhere else.

Engines of this package:

- ``sentence-transformers`` (`embeddingcache.engines.sentence_transformers`): the model runs
  in this process.
- ``backend`` (`embeddingcache.engines.backend`): an ``embeddingcache serve`` backend asked
  over HTTP; it also answers lookups and takes pushed vectors.
- ``openai`` (`embeddingcache.engines.openai`): a model behind an OpenAI-compatible
  ``POST /embeddings`` (``openai:MODEL``).

What an engine can do is data on the `Engine` base, with a default for every capability, so
that the pipeline never asks an engine what it is: ``bills_tokens`` (its tokens cost money:
counted and saved), ``answers_lookups`` (it holds what it computes: the team backend, asked
before anything is computed and never pushed to), `Engine.check_inputs` (refuse a text before
anything is sent), `Engine.holds` (whether a version's weights still exist), `Engine.lookup`
and `Engine.push`. A new engine subclasses `Engine`, overrides what it does, and is one
`register` line: nothing in the pipeline changes.

Who may change this contract: any change to `Engine`, `Limits` or `EmbedOptions` is a change
to every engine, and goes with them (see docs/architecture.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..errors import InvalidInputError, ProviderError
from ..models import ModelSpec

__all__ = [
    "REGISTRY",
    "EmbedOptions",
    "Engine",
    "EngineSettings",
    "Limits",
    "create",
    "register",
]


@dataclass(frozen=True)
class Limits:
    """What one engine takes at once: ``batch_inputs`` texts per batch, ``token_budget``
    tokens per batch (``None``: not bounded by tokens), ``in_flight`` batches at a time."""

    batch_inputs: int
    token_budget: int | None = None
    in_flight: int = 1


@dataclass(frozen=True)
class EmbedOptions:
    """Per-call options of `Engine.embed` that do not change a vector."""

    batch_size: int = 32
    # The caller shows one bar for its whole call (embeddingcache.progress): an engine draws
    # no bar of its own per batch, and may show what loading a model takes only then.
    show_progress: bool = False
    truncate: bool = False
    # False: one attempt, no retries (a probe on the read path must not hold a hit up while
    # an API cannot be reached); engines that do not retry ignore it.
    retries: bool = True
    # The longest one request may wait for its answer, in seconds (``None``: the engine's
    # own); engines that send no requests ignore it.
    timeout_s: float | None = None


@dataclass(frozen=True)
class EngineSettings:
    """How this process reaches its engines: the cache's own settings.

    ``base_url`` and ``api_key`` are the defaults of API models (``openai:``) whose spec
    carries no `embeddingcache.models.Access` of its own; ``None``: ``OPENAI_BASE_URL``,
    else OpenAI's, and ``OPENAI_API_KEY``. Keys and tokens are left out of the repr.
    """

    device: str | None = None
    batch_size: int = 32
    remote_url: str | None = None
    timeout: float = 5.0
    token: str | None = field(default=None, repr=False)
    base_url: str | None = field(default=None, repr=False)  # may carry credentials
    api_key: str | None = field(default=None, repr=False)


class Engine:
    """Something that turns texts into the float32 vectors of a model: the base of every
    engine, with a default for each capability (see the module's docstring).

    ``versioned_by`` says how the model's version is known (see `embeddingcache.versions`):
    ``"weights"`` (the engine reads it from the files it loads, `version`), ``"probe"`` (a
    model behind an API, known only by its answers: the pipeline probes it) or
    ``"backend"`` (the team backend says it with each answer).
    """

    kind: ClassVar[str] = ""
    limits: Limits = Limits(batch_inputs=32)
    versioned_by: ClassVar[str] = "weights"
    # Its tokens cost money (an API billed by the token): each computed vector's cost is
    # recorded, and a hit counts it as saved (embeddingcache.tokens).
    bills_tokens: ClassVar[bool] = False
    # It holds what it computes (the team backend): it answers `lookup` before anything is
    # computed, and what it computed is never pushed back to it.
    answers_lookups: ClassVar[bool] = False

    def embed(
        self, spec: ModelSpec, texts: Sequence[str], *, prompt: str, options: EmbedOptions
    ) -> np.ndarray:
        """Vectors of ``prompt + text`` for each text, a float32 ``(n, dim)`` array.

        Raises:
            TextTooLongError: a text is longer than the model accepts and
                ``options.truncate`` is false; its ``index`` is the position in ``texts``.
            ProviderError: the engine could not compute; the next one may.
        """
        raise NotImplementedError

    def dimension(self, spec: ModelSpec) -> int:
        """The length of the model's vectors (loading or asking for the model if needed).

        Raises:
            ProviderError: the engine cannot tell.
        """
        raise NotImplementedError

    def count_tokens(self, spec: ModelSpec, texts: Sequence[str]) -> list[int] | None:
        """The number of tokens the model reads for each text, or ``None`` when this engine
        has no tokenizer at hand (the default)."""
        return None

    def check_inputs(self, spec: ModelSpec, texts: Sequence[str], *, truncate: bool) -> None:
        """Refuse texts before any is computed (an API's input limit, checked before
        anything is paid for): the pipeline calls it on all of a call's missing texts before
        the first batch. The default takes every text.

        Raises:
            TextTooLongError: as `embed` (``index`` in ``texts``).
            ProviderError: this engine cannot compute these texts; the next one may.
        """
        return None

    def version(self, spec: ModelSpec, *, fresh: bool = False) -> str | None:
        """The version of the model this engine computes ``spec``'s vectors with, or ``None``
        when it cannot tell (then the shard's recorded version stands; the default). Cheap:
        checked at most once a second unless ``fresh``, which the pipeline asks for before
        computing. An engine whose model changed loads the new one before it computes again."""
        return None

    def holds(self, spec: ModelSpec, version: str) -> bool | None:
        """Whether the weights of ``version`` still exist where the model is loaded from;
        ``None`` when there is no telling (the default: nothing is called stale)."""
        return None

    def lookup(
        self, spec: ModelSpec, texts: Sequence[str], *, prompt: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """The stored vectors of ``texts`` and a mask of which it had (engines that
        ``answers_lookups``).

        Raises:
            ProviderError: it could not answer (the default: it holds nothing).
        """
        raise ProviderError(f"engine {self.kind!r} holds no stored vectors")

    def push(
        self,
        spec: ModelSpec,
        texts: Sequence[str],
        vectors: np.ndarray,
        *,
        prompt: str,
        version: str | None = None,
    ) -> int:
        """Offer vectors computed elsewhere to keep; how many it took (engines that
        ``answers_lookups``).

        Raises:
            ProviderError: it could not take them (the default: it keeps nothing).
        """
        raise ProviderError(f"engine {self.kind!r} keeps no vectors")

    def close(self) -> None:
        """Let go of what the engine holds (models, connections)."""
        return None


EngineFactory = Callable[[EngineSettings], Engine]

# Kind -> "module:attribute" of a factory, imported on first use (no engine's dependencies
# are imported before a vector has to be computed), or the factory itself.
REGISTRY: dict[str, str | EngineFactory] = {
    "sentence-transformers": "embeddingcache.engines.sentence_transformers:create",
    "backend": "embeddingcache.engines.backend:create",
    "openai": "embeddingcache.engines.openai:create",
}


def register(kind: str, factory: str | EngineFactory) -> None:
    """Make ``kind`` an engine kind that model specs may name."""
    REGISTRY[kind] = factory


def create(kind: str, settings: EngineSettings) -> Engine:
    """A new engine of ``kind``.

    Raises:
        InvalidInputError: no engine of that kind is registered.
    """
    try:
        factory = REGISTRY[kind]
    except KeyError:
        raise InvalidInputError(
            f"no engine {kind!r}; the engines: {', '.join(sorted(REGISTRY))}"
        ) from None
    if isinstance(factory, str):
        module, _, name = factory.partition(":")
        factory = getattr(importlib.import_module(module), name)
    return factory(settings)
