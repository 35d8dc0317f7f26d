"""Warm hits through `embeddingcache serve` on loopback, against the same hits read locally;
and the bytes a vector costs on the wire."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import msgpack

from embeddingcache import EmbeddingCache
from embeddingcache.engines.backend import LOOKUP_TEXTS, BackendEngine
from embeddingcache.models import resolve_model

from .common import DIM, MODEL, Result, median, serving_hits, timings

N = 20_000


def remote(work: Path, quick: bool) -> list[Result]:
    directory = work / "remote-server"
    with serving_hits(directory, N, seed=4) as (url, texts, vectors):
        return _measure(work, url, directory, texts, vectors, quick)


def _measure(
    work: Path, url: str, directory: Path, texts: list[str], vectors: object, quick: bool
) -> list[Result]:
    repeat = 3 if quick else 7
    spec = resolve_model(MODEL)
    with EmbeddingCache(MODEL, cache_dir=directory, remote_url=False) as local:
        local.get_embeddings(texts)
        local_time = median(timings(lambda: local.get_embeddings(texts), repeat))
    provider = BackendEngine(url, timeout=60.0)
    try:
        got, found = provider.lookup(spec, texts, prompt="")
        assert found.all()
        assert (got == vectors).all()
        remote_time = median(timings(lambda: provider.lookup(spec, texts, prompt=""), repeat))
    finally:
        provider.close()
    # A whole client call that finds everything on the backend, storing it locally.
    # The call returns once it has the backend's vectors; the writer thread stores them here
    # meanwhile, and close() waits for it: "landed" counts that wait too.
    fresh_times, landed_times = [], []
    for i in range(repeat):
        c = EmbeddingCache(MODEL, cache_dir=work / f"remote-client-{i}", remote_url=url)
        try:
            started = time.perf_counter()
            c.get_embeddings(texts)
            fresh_times.append(time.perf_counter() - started)
            assert c.stats["remote_hits"] == N
        finally:
            c.close()
        landed_times.append(time.perf_counter() - started)
        with EmbeddingCache(MODEL, cache_dir=work / f"remote-client-{i}", remote_url=False) as c:
            assert (c.get_embeddings(texts) == vectors).all()  # every one stored here
    fresh, landed = median(fresh_times), median(landed_times)
    wire = 0
    with httpx.Client(base_url=url, timeout=60) as client:
        for start in range(0, N, LOOKUP_TEXTS):
            body = {
                "texts": texts[start : start + LOOKUP_TEXTS],
                "model": MODEL,
                "normalized": True,
                "prompt": "",
                "lookup_only": True,
            }
            response = client.post(
                "/embed",
                content=msgpack.packb(body),
                headers={"Content-Type": "application/msgpack"},
            )
            wire += len(response.content)
    raw = N * 4 * DIM
    return [
        Result(
            "7. remote warm hits",
            f"{N:,} texts through serve on loopback, msgpack: vectors/s",
            N / remote_time,
            N / local_time,
            "the same hits from the local cache",
            local_time / remote_time,
            ">= 0.3x",
            local_time / remote_time >= 0.3,
            unit="vectors/s",
        ),
        Result(
            "7. remote hits stored locally",
            f"{N:,} texts a fresh client finds on the backend, stored in its own cache: vectors/s",
            N / fresh,
            N / remote_time,
            "the same fetch (BackendEngine.lookup), stored nowhere",
            remote_time / fresh,
            ">= 0.55x",
            remote_time / fresh >= 0.55,
            unit="vectors/s",
            notes=[
                f"the call returns while the writer thread stores them; with close() waiting "
                f"for that write: {N / landed:,.0f} vectors/s ({remote_time / landed:.2f}x "
                "the fetch)",
                f"against the same hits from the local cache: {local_time / fresh:.2f}x",
            ],
        ),
        Result(
            "7. remote wire size",
            "response bytes per 384-d vector",
            wire / N,
            raw / N,
            "raw float32 (1,536 bytes)",
            wire / raw,
            "<= 1.02x",
            wire / raw <= 1.02,
            unit="bytes",
        ),
    ]
