"""A model behind an API (issue 16): cold misses through ``openai:`` against the official
``openai`` client calling the same upstream itself, and warm hits of an API model's shard
against those of a local model of the same dimension.

The upstream is our own ``embeddingcache serve`` computing a StaticEmbedding model (256-d,
tests/tiny_model.py): fast enough that the client side, not the model, is what is measured.
Every round sends each side texts the upstream has never seen, so that the upstream computes
for both alike (it caches what it computed: a text sent twice would be a hit there).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from embeddingcache import EmbeddingCache

from .bench_compute import static_model
from .common import OPENAI_INPUTS, Result, median, sentences, serving, timings

N = 5_000


def api(work: Path, quick: bool) -> list[Result]:
    folder = str(static_model(work / "static-model").resolve())
    with serving(
        "-m", folder, "--cache-dir", str(work / "api-upstream"), "--batch-size", "256"
    ) as url:
        return _measure(work, folder, url + "/v1", quick)


def _measure(work: Path, folder: str, base_url: str, quick: bool) -> list[Result]:
    import openai

    rounds = 3 if quick else 5
    repeat = 5 if quick else 15
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    cache = EmbeddingCache(
        f"openai:{folder}", cache_dir=work / "api-client", base_url=base_url, remote_url=False
    )
    try:
        # Both sides warmed up: connections open, the library's version probe sent.
        cache.get_embeddings(sentences(64, seed=300, prefix="warm library "))
        client.embeddings.create(model=folder, input=sentences(64, seed=301, prefix="warm sdk "))
        library_times, sdk_times = [], []
        kept: list[str] = []
        for round_ in range(rounds):
            ours = sentences(N, seed=310 + round_, prefix=f"api library {round_} ")
            theirs = sentences(N, seed=310 + round_, prefix=f"api sdk {round_} ")
            kept = kept or ours
            # Alternate who goes first, so that drift in the machine's speed falls on both.
            for who in ("library", "sdk") if round_ % 2 == 0 else ("sdk", "library"):
                started = time.perf_counter()
                if who == "library":
                    cache.get_embeddings(ours, batch_size=OPENAI_INPUTS)
                    library_times.append(time.perf_counter() - started)
                else:
                    got = []
                    for start in range(0, N, OPENAI_INPUTS):
                        answer = client.embeddings.create(
                            model=folder, input=theirs[start : start + OPENAI_INPUTS]
                        )
                        got += [item.embedding for item in answer.data]
                    sdk_times.append(time.perf_counter() - started)
                    assert len(got) == N
        assert cache.stats["computed"] == 64 + N * rounds
        # The API's vectors, stored: read back bit for bit as the upstream returns them.
        answer = client.embeddings.create(model=folder, input=kept[:100])
        expected = np.asarray([item.embedding for item in answer.data], dtype=np.float32)
        assert np.array_equal(cache.get_embeddings(kept[:100]), expected)
        api_warm = median(timings(lambda: cache.get_embeddings(kept), repeat))
        dimension = cache.dimension()
    finally:
        cache.close()
        client.close()
    with EmbeddingCache(folder, cache_dir=work / "api-local", remote_url=False) as local:
        local.get_embeddings(kept, batch_size=256)  # computed once, then all hits
        assert local.dimension() == dimension
        local_warm = median(timings(lambda: local.get_embeddings(kept), repeat))
    library, sdk = median(library_times), median(sdk_times)
    return [
        Result(
            "16. API cold misses",
            f"{N:,} unseen texts through openai: against serve (StaticEmbedding, {dimension}-d), "
            f"{OPENAI_INPUTS:,} per request, stored as they come: texts/s",
            N / library,
            N / sdk,
            f"the official openai client, same upstream, {OPENAI_INPUTS:,} per request",
            sdk / library,
            ">= 1.0x",
            sdk / library >= 1.0,
            unit="texts/s",
            notes=[f"median of {rounds} rounds, each side its own unseen texts"],
        ),
        Result(
            "16. API warm hits",
            f"{N:,} texts of an openai: shard ({dimension}-d): vectors/s",
            N / api_warm,
            N / local_warm,
            f"the same texts from a sentence-transformers model's shard ({dimension}-d)",
            local_warm / api_warm,
            ">= 0.9x",
            local_warm / api_warm >= 0.9,
            unit="vectors/s",
        ),
    ]
