"""What every benchmark shares: data, timing, results, and the raw baselines."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "all-MiniLM-L6-v2"
DIM = 384
OPENAI_INPUTS = 2048  # OpenAI's limit of inputs per request
WORDS = (  # noqa: SIM905 (a sentence of words reads better than a list of strings)
    "cache vector text model store query batch token shard hash river stone cloud green "
    "quick brown fox jumps over lazy dog light paper music garden window table market"
).split()


@dataclass
class Result:
    """One line of the results table."""

    name: str
    measure: str  # what the figures are
    library: float
    baseline: float
    baseline_name: str
    ratio: float  # how the target is stated: library / baseline, or baseline / library
    target: str
    met: bool
    unit: str = ""
    notes: list[str] = field(default_factory=list)


def sentences(n: int, seed: int, prefix: str = "") -> list[str]:
    """``n`` distinct sentences of 6 to 14 words."""
    rng = random.Random(seed)
    return [
        f"{prefix}{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
        for i in range(n)
    ]


def random_vectors(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)


def fill(cache_dir: Path, texts: Sequence[str], vectors: np.ndarray, model: str = MODEL) -> None:
    """Store ``texts`` with ``vectors`` through the library's own write path."""
    from embeddingcache.keys import keys_of
    from embeddingcache.storage import Store, layout_for

    store = Store(layout_for(cache_dir, None))
    try:
        step = 20_000
        for start in range(0, len(texts), step):
            chunk = list(texts[start : start + step])
            store.put(model, keys_of(chunk), chunk, vectors[start : start + step])
    finally:
        store.close()


def shard_path(cache_dir: Path, model: str = MODEL) -> Path:
    from embeddingcache.keys import model_slug

    return cache_dir / f"{model_slug(model)}.db"


@contextlib.contextmanager
def serving(*args: str, module: str = "embeddingcache.cli") -> Iterator[str]:
    """``embeddingcache serve --port 0 ARGS`` in a process of its own (or ``python -m
    MODULE ARGS``, a server that prints its URL as serve does): its URL, and the process
    stopped afterwards."""
    command = ["serve", "--port", "0", *args] if module == "embeddingcache.cli" else list(args)
    server = subprocess.Popen(
        [sys.executable, "-m", module, *command],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stderr is not None
        url = ""
        for line in server.stderr:
            if " at http://" in line:
                url = line.rsplit(" at ", 1)[1].strip()
                break
        if not url:
            raise RuntimeError(f"{module} did not start")
        # Keep reading: a server whose stderr pipe fills (a model's loading bars) would stop.
        threading.Thread(target=server.stderr.read, daemon=True).start()
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@contextlib.contextmanager
def serving_hits(directory: Path, n: int, seed: int) -> Iterator[tuple[str, list[str], np.ndarray]]:
    """``n`` texts with generated vectors stored in ``directory``, served by ``embeddingcache
    serve`` in a process of its own: its URL, the texts and their vectors."""
    texts = sentences(n, seed=seed)
    vectors = random_vectors(n, seed=seed)
    fill(directory, texts, vectors)
    with serving("-m", MODEL, "--cache-dir", str(directory)) as url:
        yield url, texts, vectors


def timings(run: Callable[[], object], repeat: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        run()
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        out.append(time.perf_counter() - started)
    return out


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# -- the baselines a user would write by hand ---------------------------------------------


def key_ids(keys: Sequence[bytes]) -> list[int]:
    """The ids of 64-byte digests in a SQLite shard (schema s0006): each one's first 8 bytes,
    big-endian, signed, computed with numpy."""
    digest = np.dtype([("id", ">i8"), ("rest", "V56")])
    ids: list[int] = np.frombuffer(b"".join(keys), digest)["id"].tolist()
    return ids


class RawSqlite:
    """Hand-written sqlite3 over a shard file: what the library must be nearly as fast as."""

    CHUNK = 2000

    def __init__(self, path: Path, dim: int = DIM, *, mmap_bytes: int = 0) -> None:
        self.connection = sqlite3.connect(path)
        if mmap_bytes:  # read through a memory map, as the library's readers do
            self.connection.execute(f"PRAGMA mmap_size = {int(mmap_bytes)}")
        self.dim = dim
        self._queries: dict[int, str] = {}

    def lookup(self, texts: Sequence[str]) -> np.ndarray:
        """One IN query of ids (the digests' first 8 bytes, signed) per chunk of keys, each
        row's full key compared, numpy reassembly in input order."""
        keys = [hashlib.sha512(t.strip().encode()).digest() for t in texts]
        ids = key_ids(keys)
        where = {key: i for i, key in enumerate(keys)}
        order: list[int] = []
        blobs: list[bytes] = []
        for start in range(0, len(keys), self.CHUNK):
            chunk = ids[start : start + self.CHUNK]
            query = self._queries.get(len(chunk))
            if query is None:
                marks = ",".join("?" * len(chunk))
                query = self._queries[len(chunk)] = (
                    f"SELECT hashid, vector FROM embedding WHERE id IN ({marks})"
                )
            for hashid, vector in self.connection.execute(query, chunk):
                i = where.get(hashid)
                if i is not None:
                    order.append(i)
                    blobs.append(vector)
        found = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), self.dim)
        out = np.empty((len(keys), self.dim), dtype=np.float32)
        out[order] = found
        return out

    def one(self, text: str) -> np.ndarray:
        key = hashlib.sha512(text.strip().encode()).digest()
        row = self.connection.execute(
            "SELECT vector FROM embedding WHERE id = ? AND hashid = ?",
            (int.from_bytes(key[:8], "big", signed=True), key),
        ).fetchone()
        return np.frombuffer(row[0], dtype="<f4")

    def close(self) -> None:
        self.connection.close()
