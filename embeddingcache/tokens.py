"""What a computed vector cost, in tokens: counted by the engine's tokenizer, or estimated.

The write path records a cost for each vector an engine computed (`costs`), so that `stats`
can say how many tokens the cache saved: a hit's recorded cost is what it would have cost to
compute it again (docs/storage.md, "What the cache saved").

Which engines are counted: those whose tokens cost money (``Engine.bills_tokens``: an API's,
which bills by the token). A local model's vectors cost no money, and counting them with its
tokenizer cost more than the ~3% of the cold path the project allows for a fast model (measured in
``python -m benchmarks --only static``, issue 16): they are left uncounted (NULL). Vectors from
the team backend or a push are uncounted too: what they cost was paid elsewhere.

An engine that bills but has no tokenizer at hand (``count_tokens`` answers ``None``: an
OpenAI-compatible server whose model tiktoken does not know) gets an estimate, recorded as
one: a token per `BYTES_PER_TOKEN` bytes of UTF-8, rounded up.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engines import Engine
    from .models import ModelSpec

__all__ = ["BYTES_PER_TOKEN", "Costs", "costs", "estimate"]

logger = logging.getLogger("embeddingcache")

# OpenAI's rule of thumb for English text ("about 4 characters a token"), taken on bytes so
# that text in other scripts, which takes more tokens per character, is not underestimated.
BYTES_PER_TOKEN = 4

# Token counts of each vector (``None``: uncounted) and whether they are exact.
Costs = tuple[list[int] | None, bool]


def estimate(texts: Sequence[str]) -> list[int]:
    """A token count for each text from its length: ceil(UTF-8 bytes / `BYTES_PER_TOKEN`),
    at least 1 (an API bills a token for the shortest input)."""
    return [max(1, -(-len(text.encode("utf-8")) // BYTES_PER_TOKEN)) for text in texts]


def costs(engine: Engine, spec: ModelSpec, embedded: Sequence[str]) -> Costs:
    """What computing the vectors of ``embedded`` (the strings the model read) cost with
    ``engine``: the tokenizer's counts (exact), an estimate (not exact), or ``None`` for an
    engine whose tokens are not counted (see the module's docstring)."""
    if not engine.bills_tokens:
        return None, True
    try:
        counted = engine.count_tokens(spec, embedded)
    except Exception as exc:  # a count is bookkeeping: it never costs the vectors paid for
        logger.warning("could not count the tokens of %r (%s); estimating them", spec.name, exc)
        counted = None
    if counted is not None:
        return list(counted), True
    return estimate(embedded), False
