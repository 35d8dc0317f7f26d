"""The LlamaIndex adapter, tested with llama-index-core: a real VectorStoreIndex over it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_index.core", reason="llama-index-core is not installed")

from conftest import EncodeSpy
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from sentence_transformers import SentenceTransformer

from embeddingcache import EmbeddingCache
from embeddingcache.integrations.llama_index import CachedEmbedding

TEXTS = ["cats purr and sleep all day", "dogs bark at the mailman", "fish swim in the sea"]


@pytest.fixture
def embed_model(prompted_model: str, cache_dir: Path) -> Iterator[CachedEmbedding]:
    adapter = CachedEmbedding(prompted_model, cache_dir=cache_dir, device="cpu")
    yield adapter
    adapter.close()


def build_and_query(embed_model: BaseEmbedding, question: str) -> list[str]:
    index = VectorStoreIndex.from_documents(
        [Document(text=text) for text in TEXTS], embed_model=embed_model
    )
    found = index.as_retriever(similarity_top_k=3).retrieve(question)
    return [hit.node.get_content() for hit in found]


def test_it_is_a_llama_index_embedding(embed_model: CachedEmbedding) -> None:
    assert isinstance(embed_model, BaseEmbedding)
    assert embed_model.model_name.endswith("prompted")


def test_an_index_built_twice_computes_its_nodes_once(
    embed_model: CachedEmbedding, encode_spy: EncodeSpy
) -> None:
    first = build_and_query(embed_model, TEXTS[1])
    assert first[0] == TEXTS[1]  # the text itself, as a query, is nearest to its own node
    computed = list(encode_spy.texts)
    assert sorted(computed) == sorted([*TEXTS, TEXTS[1]])  # three nodes and one query
    second = build_and_query(embed_model, TEXTS[1])
    assert second == first
    assert encode_spy.texts == computed  # the rebuild and the query came from the cache


def test_texts_and_queries_get_the_models_prompts(
    embed_model: CachedEmbedding, prompted_model: str
) -> None:
    model = SentenceTransformer(prompted_model, device="cpu")
    documents = embed_model.get_text_embedding_batch(TEXTS)
    query = embed_model.get_query_embedding(TEXTS[0])
    np.testing.assert_allclose(documents, model.encode(TEXTS, prompt_name="document"), atol=1e-5)
    np.testing.assert_allclose(query, model.encode(TEXTS[0], prompt_name="query"), atol=1e-5)
    assert embed_model.get_text_embedding(TEXTS[0]) == documents[0]
    assert isinstance(query[0], float)


def test_the_async_forms_give_the_same_vectors(embed_model: CachedEmbedding) -> None:
    async def all_of_them() -> tuple[list[list[float]], list[float], list[float]]:
        return (
            await embed_model.aget_text_embedding_batch(TEXTS),
            await embed_model.aget_text_embedding(TEXTS[0]),
            await embed_model.aget_query_embedding(TEXTS[0]),
        )

    documents, document, query = asyncio.run(all_of_them())
    assert documents == embed_model.get_text_embedding_batch(TEXTS)
    assert document == documents[0]
    assert query == embed_model.get_query_embedding(TEXTS[0])


def test_it_works_as_settings_embed_model(
    embed_model: CachedEmbedding, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Settings, "_embed_model", None)  # restored after the test
    Settings.embed_model = embed_model
    index = VectorStoreIndex.from_documents([Document(text=text) for text in TEXTS])
    assert (
        index.as_retriever(similarity_top_k=1).retrieve(TEXTS[2])[0].node.get_content()
        == (TEXTS[2])
    )
    assert embed_model.cache.stats["computed"] == 4


def test_an_open_cache_can_be_shared_and_is_not_closed(tiny_model: str, cache_dir: Path) -> None:
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        adapter = CachedEmbedding(cache=cache)
        vectors = adapter.get_text_embedding_batch(TEXTS)
        adapter.close()
        np.testing.assert_array_equal(cache.get_embeddings(TEXTS), np.asarray(vectors, np.float32))
        # A model without prompts embeds a text alike as a document and as a query.
        assert adapter.get_query_embedding(TEXTS[0]) == vectors[0]
