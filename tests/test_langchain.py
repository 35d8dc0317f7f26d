"""The LangChain adapter, tested with langchain-core alone."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("langchain_core", reason="langchain-core is not installed")

from langchain_core.embeddings import Embeddings
from sentence_transformers import SentenceTransformer

from embeddingcache import EmbeddingCache
from embeddingcache.integrations.langchain import CachedEmbeddings

DOCS = ["a document about cats", "another about dogs"]


@pytest.fixture
def embeddings(prompted_model: str, cache_dir: Path) -> Any:
    adapter = CachedEmbeddings(prompted_model, cache_dir=cache_dir, device="cpu")
    yield adapter
    adapter.close()


def test_it_is_a_langchain_embeddings(embeddings: CachedEmbeddings) -> None:
    assert isinstance(embeddings, Embeddings)


def test_documents_and_queries_get_their_own_prompts(
    embeddings: CachedEmbeddings, prompted_model: str
) -> None:
    model = SentenceTransformer(prompted_model, device="cpu")
    documents = embeddings.embed_documents(DOCS)
    query = embeddings.embed_query(DOCS[0])
    np.testing.assert_allclose(documents, model.encode(DOCS, prompt_name="document"), atol=1e-5)
    np.testing.assert_allclose(query, model.encode(DOCS[0], prompt_name="query"), atol=1e-5)
    assert not np.allclose(query, documents[0])  # the same text, kept apart by its prompt
    assert isinstance(query[0], float) and isinstance(documents[0][0], float)


def test_the_second_time_everything_comes_from_the_cache(embeddings: CachedEmbeddings) -> None:
    first = embeddings.embed_documents(DOCS), embeddings.embed_query("a question")
    second = embeddings.embed_documents(DOCS), embeddings.embed_query("a question")
    assert first == second
    assert embeddings.cache.stats["computed"] == 3 and embeddings.cache.stats["hits"] == 3


def test_the_async_forms_give_the_same_vectors(embeddings: CachedEmbeddings) -> None:
    async def both() -> tuple[list[list[float]], list[float]]:
        return await embeddings.aembed_documents(DOCS), await embeddings.aembed_query("q?")

    documents, query = asyncio.run(both())
    assert documents == embeddings.embed_documents(DOCS)
    assert query == embeddings.embed_query("q?")


def test_an_open_cache_can_be_shared_and_is_not_closed(tiny_model: str, cache_dir: Path) -> None:
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        adapter = CachedEmbeddings(cache=cache)
        vectors = adapter.embed_documents(DOCS)
        adapter.close()
        np.testing.assert_array_equal(cache.get_embeddings(DOCS), np.asarray(vectors, np.float32))
        # A model without prompts embeds a text alike as a document and as a query.
        assert adapter.embed_query(DOCS[0]) == vectors[0]


def test_a_local_models_default_prompt_is_what_the_cache_embeds(
    prompted_model: str, cache_dir: Path
) -> None:
    model = SentenceTransformer(prompted_model, device="cpu")
    with EmbeddingCache(prompted_model, cache_dir=cache_dir, device="cpu") as cache:
        np.testing.assert_allclose(cache.get_embeddings(DOCS), model.encode(DOCS), atol=1e-5)
