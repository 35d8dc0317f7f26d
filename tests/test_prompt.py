"""``prompt=``: a literal prefix, as sentence-transformers' ``encode(prompt=...)`` takes it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from embeddingcache import EmbeddingCache, InvalidInputError

TEXTS = ["a text about cats", "another about dogs"]


@pytest.fixture
def prompted_cache(prompted_model: str, cache_dir: Path) -> Iterator[EmbeddingCache]:
    with EmbeddingCache(prompted_model, cache_dir=cache_dir, device="cpu") as cache:
        yield cache


def test_a_literal_prompt_gives_what_the_model_gives_for_it(
    prompted_cache: EmbeddingCache, prompted_model: str
) -> None:
    model = SentenceTransformer(prompted_model, device="cpu")
    for prompt in ("Represent this: ", ""):
        np.testing.assert_allclose(
            prompted_cache.get_embeddings(TEXTS, prompt=prompt),
            model.encode(TEXTS, prompt=prompt),
            atol=1e-5,
        )


def test_a_prompt_equal_to_a_named_one_shares_its_vectors(
    prompted_cache: EmbeddingCache,
) -> None:
    named = prompted_cache.get_embeddings(TEXTS, prompt_name="query")
    computed = prompted_cache.stats["computed"]
    literal = prompted_cache.get_embeddings(TEXTS, prompt="query: ")
    np.testing.assert_array_equal(literal, named)
    assert prompted_cache.stats["computed"] == computed  # same embedded string, same key


def test_the_prompt_is_part_of_the_key(prompted_cache: EmbeddingCache) -> None:
    plain = prompted_cache.get_embeddings(TEXTS[0], prompt="")
    prefixed = prompted_cache.get_embeddings(TEXTS[0], prompt="x: ")
    assert not np.allclose(plain, prefixed)
    assert prompted_cache.stats["computed"] == 2


def test_prompt_and_prompt_name_together_are_refused(prompted_cache: EmbeddingCache) -> None:
    with pytest.raises(InvalidInputError, match="prompt_name='query' or prompt='q: ', not both"):
        prompted_cache.get_embeddings(TEXTS, prompt_name="query", prompt="q: ")


def test_a_prompt_that_is_not_a_str_is_refused(prompted_cache: EmbeddingCache) -> None:
    with pytest.raises(InvalidInputError, match="prompt must be a str, not int"):
        prompted_cache.get_embeddings(TEXTS, prompt=3)  # type: ignore[call-overload]


def test_embed_passes_a_prompt_through(prompted_cache: EmbeddingCache) -> None:
    assert prompted_cache.embed(TEXTS[0], prompt="q: ") == (
        prompted_cache.get_embeddings(TEXTS[0], prompt="q: ").tolist()
    )
