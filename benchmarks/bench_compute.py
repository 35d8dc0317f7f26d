"""Cold misses against the model alone, and a fresh process against importing the model's
library: what the cache costs when it has nothing, and what it saves when it has everything."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from embeddingcache import EmbeddingCache

from .common import MODEL, Result, fill, median, random_vectors, sentences


def cold_misses(work: Path, quick: bool) -> list[Result]:
    from sentence_transformers import SentenceTransformer

    from embeddingcache.engines.sentence_transformers import loading_for
    from embeddingcache.models import resolve_model

    n, batch = (256, 32) if quick else (1024, 32)
    rounds = 3 if quick else 5
    model = SentenceTransformer(loading_for(resolve_model(MODEL)).load_source(), device="cpu")
    library_times, model_times = [], []
    with EmbeddingCache(MODEL, cache_dir=work / "cold", remote_url=False, device="cpu") as cache:
        cache.dimension()  # load the model before timing: both sides start loaded
        model.encode(sentences(64, seed=99), batch_size=batch)
        for round_ in range(rounds):
            texts = sentences(n, seed=1000 + round_, prefix=f"cold {round_} ")
            # Alternate who goes first, so that drift in the machine's speed falls on both.
            order = ("library", "model") if round_ % 2 == 0 else ("model", "library")
            for who in order:
                started = time.perf_counter()
                if who == "library":
                    cache.get_embeddings(texts, batch_size=batch)
                    library_times.append(time.perf_counter() - started)
                else:
                    model.encode(texts, batch_size=batch)
                    model_times.append(time.perf_counter() - started)
        assert cache.stats["computed"] == n * rounds
    library, baseline = median(library_times), median(model_times)
    overhead = library / baseline - 1
    return [
        Result(
            "3. cold misses",
            f"{n} unseen texts, batch {batch}: texts/s",
            n / library,
            n / baseline,
            f"SentenceTransformer.encode ({MODEL}, CPU)",
            library / baseline,
            "<= 1.05x (5% overhead)",
            overhead <= 0.05,
            unit="texts/s",
            notes=[f"overhead {overhead * 100:+.1f}% (median of {rounds} rounds)"],
        )
    ]


FETCH = """
import sys
from embeddingcache import get_embeddings
texts = open(sys.argv[1], encoding="utf-8").read().splitlines()
vectors = get_embeddings(texts, "all-MiniLM-L6-v2", cache_dir=sys.argv[2])
assert vectors.shape == (1000, 384)
"""
IMPORT = "import sentence_transformers"


def fresh_process(work: Path, quick: bool) -> list[Result]:
    directory = work / "fresh"
    texts = sentences(1000, seed=5)
    fill(directory, texts, random_vectors(1000, seed=5))
    listing = work / "fresh.txt"
    listing.write_text("\n".join(texts) + "\n", encoding="utf-8")
    runs = 3 if quick else 7
    fetch_times, import_times = [], []
    for _ in range(runs):
        for script, args, times in (
            (FETCH, [str(listing), str(directory)], fetch_times),
            (IMPORT, [], import_times),
        ):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", script, *args], check=True)
            times.append(time.perf_counter() - started)
    library, baseline = median(fetch_times), median(import_times)
    return [
        Result(
            "4. fresh process",
            "start to finish, seconds: fetch 1,000 cached vectors",
            library,
            baseline,
            "a process that only imports sentence_transformers",
            library / baseline,
            "<= 0.15x",
            library / baseline <= 0.15,
            unit="s",
        )
    ]
