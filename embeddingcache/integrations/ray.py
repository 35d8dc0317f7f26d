"""Ray Data: a column of vectors, each text computed once across the cluster.

    import ray
    from embeddingcache import EmbeddingCache
    from embeddingcache.integrations.ray import EmbedBatches

    cache = EmbeddingCache("all-MiniLM-L6-v2", db_url="postgresql://team-db/embeddings")
    ds = ray.data.read_parquet("s3://corpus/")
    ds = ds.map_batches(
        EmbedBatches,
        fn_constructor_args=(cache,),
        compute=ray.data.ActorPoolStrategy(size=4),  # 4 actors,
        num_gpus=1,  # a GPU each
        batch_size=1024,
    )

Each actor opens the cache once, in its constructor (the cache arrives pickled as its
configuration: see `embeddingcache.travel`), reads the ``text`` column of each batch and
adds an ``embedding`` column (see `embeddingcache.integrations.batches.EmbedColumn` for the
batch formats). On an actor Ray gave a GPU, the model loads on it. Actors that share a store
compute each text once between them (a text two of them need is claimed by one and waited
for by the other), and `EmbeddingCache.missing` tells the driver what is left to send.

A function that closes over a cache built on the driver works too, one open cache per worker
process. Needs ``ray[data]`` (``embeddingcache[ray]``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ray

from .. import travel
from ..cache import EmbeddingCache
from .batches import EmbedColumn

__all__ = ["EmbedBatches", "actor_device"]


class EmbedBatches(EmbedColumn):
    """The callable class for ``Dataset.map_batches``: `EmbedColumn` over the cache as
    this actor opens it, on the GPU Ray gave the actor if any. Its arguments are
    `EmbedColumn`'s (``fn_constructor_args`` / ``fn_constructor_kwargs``)."""

    def __init__(self, cache: EmbeddingCache, **arguments: Any) -> None:
        super().__init__(_on_this_actor(cache), **arguments)


def actor_device(device: str | None, gpu_ids: list[object]) -> str | None:
    """Where an actor that Ray gave ``gpu_ids`` computes, for a cache built with
    ``device``: a CUDA device the driver named (``cuda:1``) is the actor's own GPU
    (``cuda``: Ray shows an actor only its GPUs); any other choice stands, and ``None`` finds
    the GPU by itself."""
    if gpu_ids and device is not None and device.startswith("cuda:"):
        return "cuda"
    return device


def _on_this_actor(cache: EmbeddingCache) -> EmbeddingCache:
    device = actor_device(cache.device, list(ray.get_gpu_ids()))
    if device == cache.device:
        return cache
    config = dataclasses.replace(cache.config, device=device)
    moved: EmbeddingCache = travel.reopen(EmbeddingCache, config)
    return moved
