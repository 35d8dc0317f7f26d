"""One call's data: the prepared request (`Call`), the shard it is answered from (`Target`),
what it learns while it runs (`Resolution`), and what it yields (`Slice`).

A `Call` is made once by `Pipeline.prepare` and never changes. A `Resolution` is made once by
`Pipeline.resolve` for that call and changes only through its own methods: the shard it
answers from (a backend may name another version of the model), the stored rows found
damaged, and the engines that failed it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from ..engines import EmbedOptions
from ..errors import ProviderError
from ..keys import keys_of
from ..models import ModelSpec
from ..tokens import Costs

__all__ = ["Call", "Resolution", "Rows", "Slice", "Source", "Target", "dedupe"]

Source = Literal["hit", "remote", "computed", "waited"]


@dataclass(frozen=True)
class Slice:
    """Vectors for some of a call's distinct texts: ``positions`` index `Call.firsts`
    (the call's distinct keys), ``vectors`` are float32 ``(len(positions), dim)``, as stored
    (or as computed, when storing failed and the call degraded), and ``source`` says where
    they came from: stored at the lookup (``"hit"``), the backend's (``"remote"``), computed
    here (``"computed"``, by this machine or the backend), or computed by another call while
    this one waited (``"waited"``)."""

    positions: np.ndarray
    vectors: np.ndarray
    source: Source


class Target(NamedTuple):
    """The shard that answers a call and the model version it holds (``None``: unknown);
    ``pinned`` says this machine's engine vouched for the version, so that vectors of
    another version (a backend's) are refused rather than adopted."""

    shard: str
    version: str | None = None
    pinned: bool = False


@dataclass(frozen=True)
class Rows:
    """Fresh vectors bound for one shard, whoever computed them: the keys and embedded
    strings of distinct texts, their vectors, the keys whose stored rows are damaged
    (replaced), and what they cost in tokens (`embeddingcache.tokens.costs`)."""

    model: str
    target: Target
    keys: list[bytes]
    texts: list[str]
    vectors: np.ndarray
    replace: list[bytes]
    cost: Costs = (None, True)


def dedupe(keys: Sequence[bytes]) -> tuple[list[int], np.ndarray | None]:
    """The one rule for duplicates: the index of the first occurrence of each distinct key,
    in order of first appearance, and for each key the position of its distinct key
    (``None`` when every key is distinct, the hot path)."""
    if len(keys) < 2:  # one text: a query embedded per request
        return list(range(len(keys))), None
    distinct = dict.fromkeys(keys)
    if len(distinct) == len(keys):
        return list(range(len(keys))), None
    where: dict[bytes, int] = {}
    firsts: list[int] = []
    inverse = np.empty(len(keys), dtype=np.intp)
    for i, key in enumerate(keys):
        u = where.get(key)
        if u is None:
            u = where[key] = len(firsts)
            firsts.append(i)
        inverse[i] = u
    return firsts, inverse


class Call:
    """One prepared request: the spec, the embedded strings, their keys and duplicates, and
    the `Target` that `Pipeline.prepare` found for the model's current version."""

    __slots__ = (
        "embedded",
        "firsts",
        "inverse",
        "keys",
        "normalized",
        "prompt",
        "spec",
        "target",
    )

    def __init__(
        self, spec: ModelSpec, normalized: list[str], prompt: str, target: Target | None = None
    ) -> None:
        self.spec = spec
        self.target = target if target is not None else Target(spec.name)
        self.normalized = normalized
        self.prompt = prompt
        self.embedded = [prompt + text for text in normalized] if prompt else normalized
        self.keys = keys_of(self.embedded)
        self.firsts, self.inverse = dedupe(self.keys)

    @property
    def version(self) -> str | None:
        """The model version the call was prepared for."""
        return self.target.version

    def distinct_keys(self, positions: Sequence[int] | np.ndarray | None = None) -> list[bytes]:
        keys, firsts = self.keys, self.firsts
        if positions is None:
            return keys if self.inverse is None else [keys[i] for i in firsts]
        return [keys[firsts[u]] for u in positions]

    def embedded_at(self, positions: Sequence[int] | np.ndarray) -> list[str]:
        """The embedded strings of the distinct texts at ``positions``."""
        return [self.embedded[self.firsts[u]] for u in positions]

    def normalized_at(self, positions: Sequence[int] | np.ndarray) -> list[str]:
        """The normalized texts (without the prompt) of the distinct texts at ``positions``."""
        return [self.normalized[self.firsts[u]] for u in positions]


class Resolution:
    """What one call learns on its way through the pipeline, made once by
    `Pipeline.resolve` and changed only through its methods.

    ``target`` is the shard the call answers from now; ``damaged`` the keys whose stored
    rows have the wrong length; ``failed`` the engines of the chain that could not compute
    (not asked again in this call); ``options`` the engine options of its computing.
    """

    __slots__ = ("call", "damaged", "failed", "options", "target")

    def __init__(self, call: Call, options: EmbedOptions) -> None:
        self.call = call
        self.options = options
        self.target = call.target
        self.damaged: frozenset[bytes] = frozenset()
        self.failed: list[tuple[str, ProviderError]] = []

    def switch(self, target: Target) -> None:
        """Answer the rest of the call from ``target`` (another version of the model)."""
        self.target = target

    def found_damaged(self, keys: Sequence[bytes]) -> None:
        """The stored rows of ``keys`` have the wrong length: they are replaced when written."""
        self.damaged = frozenset(keys)

    def fail(self, engine: str, exc: ProviderError) -> None:
        """``engine`` could not compute for this call: the next of the chain is asked."""
        self.failed.append((engine, exc))

    def has_failed(self, engine: str) -> bool:
        return any(name == engine for name, _ in self.failed)

    def rows(
        self,
        positions: np.ndarray,
        vectors: np.ndarray,
        cost: Costs = (None, True),
        *,
        target: Target | None = None,
    ) -> Rows:
        """The distinct texts at ``positions`` with ``vectors``, bound for ``target``: the
        call's shard when the vectors were computed or fetched (by default, as it is now)."""
        call = self.call
        keys = call.distinct_keys(positions)
        damaged = self.damaged
        return Rows(
            model=call.spec.name,
            target=target if target is not None else self.target,
            keys=keys,
            texts=call.embedded_at(positions),
            vectors=vectors,
            replace=[key for key in keys if key in damaged] if damaged else [],
            cost=cost,
        )
