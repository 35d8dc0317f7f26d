"""Readers beside a writer on one SQLite cache: WAL readers must not wait for the writer."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

from .common import MODEL, Result, fill, random_vectors, sentences

N = 20_000
SECONDS = 6.0
WRITE_BATCH = 500


def _reader(directory: str, start: Any, stop: Any, counts: Any, slot: int) -> None:
    from embeddingcache import EmbeddingCache

    texts = sentences(N, seed=6)
    with EmbeddingCache(MODEL, cache_dir=directory, remote_url=False) as cache:
        cache.get_embeddings(texts[:100])
        start.wait()
        done = 0
        while not stop.is_set():
            for begin in range(0, N, 2000):
                done += len(cache.get_embeddings(texts[begin : begin + 2000]))
                if stop.is_set():
                    break
        counts[slot] = done


def _writer(directory: str, start: Any, stop: Any, rate: float, written: Any) -> None:
    from embeddingcache.keys import keys_of
    from embeddingcache.storage import Store, layout_for

    store = Store(layout_for(Path(directory), None))
    start.wait()
    began = time.monotonic()
    done, batch = 0, 0
    while not stop.is_set():
        texts = sentences(WRITE_BATCH, seed=10_000 + batch, prefix=f"new {batch} ")
        store.put(MODEL, keys_of(texts), texts, random_vectors(WRITE_BATCH, seed=batch))
        done += WRITE_BATCH
        batch += 1
        if rate:  # a pipeline computing vectors: they come at the model's pace
            pause = began + done / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
    store.close()
    written.value = done


def _run(directory: Path, readers: int, writer_rate: float | None) -> tuple[float, float]:
    """Vectors read per second per reader, and written per second, over ``SECONDS``."""
    ctx = mp.get_context("spawn")
    start, stop = ctx.Event(), ctx.Event()
    counts = ctx.Array("q", readers)
    written = ctx.Value("q", 0)
    processes = [
        ctx.Process(target=_reader, args=(str(directory), start, stop, counts, i))
        for i in range(readers)
    ]
    if writer_rate is not None:
        processes.append(
            ctx.Process(target=_writer, args=(str(directory), start, stop, writer_rate, written))
        )
    for process in processes:
        process.start()
    time.sleep(3.0)  # let them import and open the cache
    start.set()
    time.sleep(SECONDS)
    stop.set()
    for process in processes:
        process.join(timeout=120)
    return sum(counts) / readers / SECONDS, written.value / SECONDS


def readers_beside_a_writer(work: Path, quick: bool) -> list[Result]:
    directory = work / "concurrency"
    fill(directory, sentences(N, seed=6), random_vectors(N, seed=6))
    lone, _ = _run(directory, 1, None)
    pair, _ = _run(directory, 2, None)
    paced, paced_rate = _run(directory, 2, 5000.0)
    flat, flat_rate = _run(directory, 2, 0.0)
    return [
        Result(
            "8. readers beside a writer",
            "2 reader processes + 1 writer of new vectors: vectors/s per reader",
            paced,
            lone,
            "a lone reader",
            paced / lone,
            ">= 0.7x",
            paced / lone >= 0.7,
            unit="vectors/s",
            notes=[
                f"writer at a fixed {paced_rate:,.0f} new vectors/s "
                "(more than a CPU model computes)",
                f"two readers, no writer: {pair:,.0f}/s each ({pair / lone:.2f}x lone)",
                f"writer flat out ({flat_rate:,.0f} vectors/s, a third process on 2 cores): "
                f"{flat:,.0f}/s each ({flat / lone:.2f}x lone)",
            ],
        )
    ]
