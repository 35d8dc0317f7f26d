"""Warm hits against LangChain's CacheBackedEmbeddings, the cache users otherwise reach for."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from embeddingcache import EmbeddingCache

from .common import DIM, MODEL, Result, fill, median, random_vectors, sentences, timings

N = 20_000


def langchain(work: Path, quick: bool) -> list[Result]:
    from langchain_classic.embeddings import CacheBackedEmbeddings
    from langchain_classic.storage import LocalFileStore
    from langchain_core.embeddings import Embeddings
    from langchain_core.stores import InMemoryByteStore

    texts = sentences(N, seed=3)
    vectors = random_vectors(N, seed=3)
    table = dict(zip(texts, vectors.tolist(), strict=True))

    class Precomputed(Embeddings):
        """A zero-cost embedder: the vectors are already at hand."""

        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return [table[text] for text in texts]

        def embed_query(self, text: str) -> list[float]:
            return table[text]

    directory = work / "alternatives"
    fill(directory, texts, vectors)
    repeat = 3 if quick else 7
    results = []
    with EmbeddingCache(MODEL, cache_dir=directory, remote_url=False) as cache:
        assert (cache.get_embeddings(texts) == vectors).all()
        ours = median(timings(lambda: cache.get_embeddings(texts), repeat))
        ours_lists = median(timings(lambda: cache.embed(texts), repeat))
    for name, store in (
        ("InMemoryByteStore", InMemoryByteStore()),
        ("LocalFileStore", LocalFileStore(work / "langchain-files")),
    ):
        backed = CacheBackedEmbeddings.from_bytes_store(
            Precomputed(), store, namespace=MODEL, key_encoder="sha512"
        )
        backed.embed_documents(texts)  # fills its store
        assert np.array_equal(
            np.asarray(backed.embed_documents(texts[:10]), np.float32), vectors[:10]
        )
        theirs = median(timings(lambda b=backed: b.embed_documents(texts), repeat, warmup=0))
        results.append(
            Result(
                f"6. vs LangChain ({name})",
                f"warm hits, {N:,} texts, {DIM}-d, zero-cost embedder: vectors/s",
                N / ours,
                N / theirs,
                f"CacheBackedEmbeddings over {name}",
                theirs / ours,
                ">= 20x",
                theirs / ours >= 20,
                unit="vectors/s",
                notes=[
                    f"as Python lists (embed(), what LangChain returns): "
                    f"{N / ours_lists:,.0f} vectors/s, {theirs / ours_lists:.1f}x theirs"
                ],
            )
        )
    return results
