"""A LangChain ``Embeddings`` backed by an `embeddingcache.EmbeddingCache`.

    from embeddingcache.integrations.langchain import CachedEmbeddings

    embeddings = CachedEmbeddings("all-MiniLM-L6-v2")
    embeddings.embed_documents(["a document"]), embeddings.embed_query("a question")

Documents and queries are embedded with the model's document and query prompts when it has
them (nomic-embed-text-v2's ``search_document: `` and ``search_query: ``), so a query is never
served a document's vector. Needs ``langchain-core`` (``embeddingcache[langchain]``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from langchain_core.embeddings import Embeddings

from ..cache import EmbeddingCache
from ._prompts import document_and_query_prompts

__all__ = ["CachedEmbeddings"]


class CachedEmbeddings(Embeddings):
    """LangChain embeddings that compute each text once, then read it from the cache.

    Args:
        model: the model (see `embeddingcache.EmbeddingCache`).
        cache: an open cache to use; by default one is made from ``model`` and
            ``cache_options`` (``cache_dir=``, ``db_url=``, ``remote_url=``...) and closed
            by `close`.
        base_url, api_key: for an ``openai:`` model, the OpenAI-compatible API and its key
            (see `embeddingcache.EmbeddingCache`), used by every call, also with ``cache=``.
            The key is never stored, logged or shown.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        cache: EmbeddingCache | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        **cache_options: Any,
    ) -> None:
        self._owned = cache is None
        self.cache = (
            cache
            if cache is not None
            else EmbeddingCache(model, base_url=base_url, api_key=api_key, **cache_options)
        )
        self.model = model if model is not None else self.cache.model
        self._api: dict[str, Any] = {"base_url": base_url, "api_key": api_key}
        self.document_prompt, self.query_prompt = document_and_query_prompts(self.model)

    def __repr__(self) -> str:
        return f"CachedEmbeddings(model={self.model!r})"

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """One vector per document, as lists of floats, in order."""
        vectors: list[list[float]] = self.cache.get_embeddings(
            texts, self.model, prompt_name=self.document_prompt, **self._api
        ).tolist()
        return vectors

    def embed_query(self, text: str) -> list[float]:
        """The vector of a query, with the model's query prompt."""
        vector: list[float] = self.cache.get_embeddings(
            text, self.model, prompt_name=self.query_prompt, **self._api
        ).tolist()
        return vector

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """`embed_documents` for async code, in a worker thread (the cache is thread-safe)."""
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        """`embed_query` for async code, in a worker thread."""
        return await asyncio.to_thread(self.embed_query, text)

    def close(self) -> None:
        """Close the cache, if this object made it."""
        if self._owned:
            self.cache.close()
