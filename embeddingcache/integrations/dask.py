"""Dask: vectors for a bag of texts or a dataframe's column, each text computed once across
the cluster.

    from embeddingcache import EmbeddingCache
    from embeddingcache.integrations.dask import embed_bag, embed_dataframe

    cache = EmbeddingCache("all-MiniLM-L6-v2", db_url="postgresql://team-db/embeddings")
    vectors = embed_bag(texts_bag, cache)                  # a bag of (n, dim) arrays
    frame = embed_dataframe(frame, cache, column="text")   # adds an "embedding" column

Both are ``map_partitions`` over `EmbedTexts` / `EmbedColumn`, which pickle as the cache's
configuration (see `embeddingcache.travel`): each worker process opens the cache once. The
cache itself travels too: ``client.map(cache.get_embeddings, chunks)`` works, and Dask
hashes it deterministically. Needs ``dask[dataframe,distributed]`` (``embeddingcache[dask]``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import dask.bag
import dask.dataframe
import pandas as pd

from ..cache import EmbeddingCache
from .batches import EmbedColumn, EmbedTexts

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..options import CallOptions

__all__ = ["embed_bag", "embed_dataframe"]


def embed_bag(
    texts: dask.bag.Bag,
    cache: EmbeddingCache,
    model: str | None = None,
    **options: Unpack[CallOptions],
) -> dask.bag.Bag:
    """A bag with one ``(n, dim)`` float32 array per partition of ``texts``, its rows in
    the partition's order (``.compute()`` gives the list of arrays; ``np.vstack`` it)."""
    bag: dask.bag.Bag = texts.map_partitions(EmbedTexts(cache, model, **options))  # type: ignore[no-untyped-call]
    return bag


def embed_dataframe(
    frame: dask.dataframe.DataFrame,
    cache: EmbeddingCache,
    *,
    column: str = "text",
    output_column: str = "embedding",
    model: str | None = None,
    **options: Unpack[CallOptions],
) -> dask.dataframe.DataFrame:
    """``frame`` with ``output_column`` added: one 1-d float32 array a row, the vector of
    its ``column``."""
    embed = EmbedColumn(cache, column=column, output_column=output_column, model=model, **options)
    meta: Any = frame._meta.assign(**{output_column: pd.Series([], dtype=object)})
    embedded: dask.dataframe.DataFrame = frame.map_partitions(embed, meta=meta)  # type: ignore[no-untyped-call]
    return embedded
