"""One process of a team test: waits for the start file, embeds the texts, and writes what it
computed (counted through the model's own ``encode``) and the vectors it got.

python tests/team_worker.py MODEL STORE TEXTS_FILE START_FILE OUT_PREFIX [SLOW_S]

STORE is a cache folder or a database URL; SLOW_S makes each call of the model that
long, and each call's 16 texts a slice stored as it comes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer

from embeddingcache import EmbeddingCache
from embeddingcache.pipeline import StoreEvery

model, store, texts_file, start_file, out = sys.argv[1:6]
slow = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
computed: list[str] = []
original = SentenceTransformer.encode


def encode(self: SentenceTransformer, inputs: list[str], *args: object, **kwargs: object) -> object:
    computed.extend(inputs)
    if slow:
        time.sleep(slow)
    return original(self, inputs, *args, **kwargs)


SentenceTransformer.encode = encode  # type: ignore[method-assign]
texts = json.loads(Path(texts_file).read_text(encoding="utf-8"))
where = {"db_url": store} if "://" in store else {"cache_dir": store}
with EmbeddingCache(model, device="cpu", remote_url=False, batch_size=8, **where) as cache:
    cache.dimension()  # the model loaded before the start, as a pipeline warmed up
    if slow:  # a slice of 16 texts per model call: each stored as it comes
        cache.pipeline.store_every = StoreEvery(vectors=16, seconds=3600)
    Path(out + ".ready").write_text(str(os.getpid()))
    while not Path(start_file).exists():
        time.sleep(0.005)
    vectors = cache.get_embeddings(texts)
    stats = cache.stats
np.save(out + ".npy", vectors)
Path(out + ".json").write_text(json.dumps({"computed": computed, "stats": stats}))
