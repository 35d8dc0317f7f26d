"""Cold misses against the model alone, and a fresh process against importing the model's
library: what the cache costs when it has nothing, and what it saves when it has everything."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from embeddingcache import EmbeddingCache

from .bench_storage import raw_sqlite_insert
from .common import MODEL, Result, fill, median, random_vectors, sentences


def cold_misses(work: Path, quick: bool) -> list[Result]:
    from sentence_transformers import SentenceTransformer

    from embeddingcache.engines.sentence_transformers import loading_for
    from embeddingcache.models import resolve_model

    n, batch = (256, 32) if quick else (1024, 32)
    rounds = 3 if quick else 5
    model = SentenceTransformer(loading_for(resolve_model(MODEL)).load_source(), device="cpu")
    with EmbeddingCache(MODEL, cache_dir=work / "cold", remote_url=False, device="cpu") as cache:
        cache.dimension()  # load the model before timing: both sides start loaded
        model.encode(sentences(64, seed=99), batch_size=batch)
        library, baseline = _alternating(cache, model, n, batch, rounds, seed=1000, tag="cold")
        assert cache.stats["computed"] == n * rounds
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


def static_cold_misses(work: Path, quick: bool) -> list[Result]:
    """Cold misses with a model as fast as a transformer on a GPU: what storing costs when
    computing costs little (issue 17). The cache must keep up with the model's bare encode,
    its writer thread storing one slice while the model computes the next."""
    import torch
    from sentence_transformers import SentenceTransformer

    folder = static_model(work / "static-model")
    n, batch = (5_000, 256) if quick else (20_000, 256)
    rounds = 3 if quick else 5
    model = SentenceTransformer(str(folder), device="cpu")
    with EmbeddingCache(
        str(folder), cache_dir=work / "static-cold", remote_url=False, device="cpu"
    ) as cache:
        cache.get_embeddings(sentences(64, seed=98), batch_size=batch)  # load, warm up
        model.encode(sentences(64, seed=99), batch_size=batch)
        library, baseline = _alternating(cache, model, n, batch, rounds, seed=2000, tag="static")
        assert cache.stats["computed"] == n * rounds + 64
        # The floor under any cache of these vectors: hand-written sqlite3 storing the same
        # rows, nothing else. Where the model keeps every core busy (a CPU model), the
        # writer's time adds to the model's instead of overlapping it.
        texts = sentences(n, seed=2000, prefix="static raw ")
        vectors = model.encode(texts, batch_size=batch)
        raw = median(
            [raw_sqlite_insert(work / f"static-raw-{r}", texts, vectors) for r in range(rounds)]
        )
        # How many cores the bare encode keeps busy (the tokenizer's threads, torch's): the
        # writer thread overlaps the model only on the cores it leaves free.
        cpu, wall = time.process_time(), time.perf_counter()
        model.encode(texts, batch_size=batch)
        cores = (time.process_time() - cpu) / (time.perf_counter() - wall)
        # The same with the model on one core, as a GPU leaves the host's cores to the rest:
        # the writer thread then has a core of its own (and still shares the GIL).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one_core = _alternating(cache, model, n, batch, 3, seed=3000, tag="static 1-core")
        finally:
            torch.set_num_threads(threads)
    ratio = baseline / library
    ceiling = baseline / (baseline + raw)
    return [
        Result(
            "3. cold misses, fast model",
            f"{n:,} unseen texts, batch {batch}, stored as they go: texts/s",
            n / library,
            n / baseline,
            "SentenceTransformer.encode (a StaticEmbedding model, CPU)",
            ratio,
            ">= 0.85x",
            ratio >= 0.85,
            unit="texts/s",
            notes=[
                f"{ratio:.2f}x the bare encode (median of {rounds} rounds)",
                f"raw sqlite3 storing the same rows alone takes {raw / baseline:.0%} of the "
                f"bare encode's time: {ceiling:.2f}x if it could not overlap the model",
                f"the bare encode keeps {cores:.1f} of this machine's {os.cpu_count()} cores busy",
                f"with the model on one core (torch.set_num_threads(1), both sides, median of 3): "
                f"{one_core[1] / one_core[0]:.2f}x ({n / one_core[0]:,.0f} against "
                f"{n / one_core[1]:,.0f} texts/s)",
            ],
        )
    ]


def _alternating(
    cache: EmbeddingCache, model: Any, n: int, batch: int, rounds: int, *, seed: int, tag: str
) -> tuple[float, float]:
    """Median seconds of the cache's cold misses and of the model's bare encode, over
    ``rounds`` of ``n`` unseen texts each, the same texts for both."""
    library_times, model_times = [], []
    for round_ in range(rounds):
        texts = sentences(n, seed=seed + round_, prefix=f"{tag} {round_} ")
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
    return median(library_times), median(model_times)


def static_model(folder: Path) -> Path:
    """The tests' StaticEmbedding model (tests/tiny_model.py), built offline."""
    if not folder.exists():
        path = Path(__file__).resolve().parent.parent / "tests" / "tiny_model.py"
        spec = importlib.util.spec_from_file_location("tiny_model", path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.build_static_model(folder)
    return folder


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
