"""A LlamaIndex ``BaseEmbedding`` backed by an `embeddingcache.EmbeddingCache`.

    from llama_index.core import Settings
    from embeddingcache.integrations.llama_index import CachedEmbedding

    Settings.embed_model = CachedEmbedding("all-MiniLM-L6-v2")

Texts (nodes) and queries are embedded with the model's document and query prompts when it has
them, so a query is never served a document's vector. Rebuilding an index over the same nodes
computes nothing. Needs ``llama-index-core`` (``embeddingcache[llama-index]``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.constants import DEFAULT_EMBED_BATCH_SIZE
from pydantic import PrivateAttr

from ..cache import EmbeddingCache
from ._prompts import document_and_query_prompts

__all__ = ["CachedEmbedding"]


class CachedEmbedding(BaseEmbedding):
    """LlamaIndex embeddings that compute each text once, then read it from the cache.

    Args:
        model: the model (see `embeddingcache.EmbeddingCache`).
        cache: an open cache to use; by default one is made from ``model`` and
            ``cache_options`` (``cache_dir=``, ``db_url=``, ``remote_url=``...) and closed
            by `close`.
        embed_batch_size: how many texts LlamaIndex hands over at once.
    """

    _cache: EmbeddingCache = PrivateAttr()
    _owned: bool = PrivateAttr()
    _document_prompt: str | None = PrivateAttr()
    _query_prompt: str | None = PrivateAttr()

    def __init__(
        self,
        model: str | None = None,
        *,
        cache: EmbeddingCache | None = None,
        embed_batch_size: int = DEFAULT_EMBED_BATCH_SIZE,
        **cache_options: Any,
    ) -> None:
        opened = cache if cache is not None else EmbeddingCache(model, **cache_options)
        super().__init__(
            model_name=model if model is not None else opened.model,
            embed_batch_size=embed_batch_size,
        )
        self._cache = opened
        self._owned = cache is None
        self._document_prompt, self._query_prompt = document_and_query_prompts(self.model_name)

    @classmethod
    def class_name(cls) -> str:
        return "CachedEmbedding"

    @property
    def cache(self) -> EmbeddingCache:
        """The cache the vectors come from."""
        return self._cache

    def _get_query_embedding(self, query: str) -> list[float]:
        vector: list[float] = self._cache.get_embeddings(
            query, self.model_name, prompt_name=self._query_prompt
        ).tolist()
        return vector

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._get_text_embeddings([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        vectors: list[list[float]] = self._cache.get_embeddings(
            texts, self.model_name, prompt_name=self._document_prompt
        ).tolist()
        return vectors

    # The async forms run in a worker thread (the cache is thread-safe): neither a hit nor a
    # model computing blocks the event loop.
    async def _aget_query_embedding(self, query: str) -> list[float]:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)

    def close(self) -> None:
        """Close the cache, if this object made it."""
        if self._owned:
            self._cache.close()
