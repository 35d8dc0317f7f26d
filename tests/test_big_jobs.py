"""Big jobs (issue 17): a call stores its computed vectors in slices as it goes, so an
interrupt keeps every completed slice and a second run computes only the rest."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embeddingcache import AllProvidersFailedError, EmbeddingCache
from embeddingcache.keys import keys_of
from embeddingcache.pipeline import StoreEvery


class FailingEncode:
    """Wraps the real encode: counts the texts it encodes and, once armed, raises
    ``error`` on the ``at``-th call."""

    def __init__(self) -> None:
        self.calls = 0
        self.texts = 0
        self.at: int | None = None
        self.error: BaseException = RuntimeError("the model crashed")


@pytest.fixture
def fault(monkeypatch: pytest.MonkeyPatch) -> FailingEncode:
    from sentence_transformers import SentenceTransformer

    state = FailingEncode()
    original = SentenceTransformer.encode

    def encode(self: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        state.calls += 1
        if state.at is not None and state.calls == state.at:
            raise state.error
        state.texts += len(inputs)
        return original(self, inputs, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "encode", encode)
    return state


@pytest.fixture
def sliced(tiny_model: str, cache_dir: Path) -> Any:
    """A cache that stores every 8 vectors, 4 texts per batch: an engine call is 8 texts."""
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu", batch_size=4) as c:
        c.pipeline.store_every = StoreEvery(vectors=8, seconds=3600)
        yield c


def stored_count(cache: EmbeddingCache, texts: list[str]) -> int:
    return len(cache._store.lookup(cache.model, keys_of(texts)).positions)


TEXTS = [f"text number {i}" for i in range(40)]


@pytest.mark.parametrize(
    "error", [RuntimeError("the model crashed"), KeyboardInterrupt()], ids=["crash", "ctrl-c"]
)
def test_an_interrupt_midway_keeps_the_completed_slices_and_a_rerun_computes_the_rest(
    sliced: EmbeddingCache, fault: FailingEncode, direct_model: Any, error: BaseException
) -> None:
    sliced.get_embeddings("load the model")  # its first call is not one of the counted
    fault.calls, fault.texts = 0, 0
    fault.at, fault.error = 4, error
    expected = AllProvidersFailedError if isinstance(error, Exception) else KeyboardInterrupt
    with pytest.raises(expected):
        sliced.get_embeddings(TEXTS)
    assert stored_count(sliced, TEXTS) == 24  # three engine calls of 8 finished
    fault.at, fault.texts = None, 0
    vectors = sliced.get_embeddings(TEXTS)
    assert fault.texts == 16  # only the rest
    np.testing.assert_allclose(vectors, direct_model.encode(TEXTS, batch_size=4), atol=1e-5)


def test_each_slice_is_stored_by_the_writer_thread_before_it_is_yielded(
    sliced: EmbeddingCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    writers: set[str] = set()
    store = sliced._store
    original = store.put

    def put(*args: Any, **kwargs: Any) -> Any:
        writers.add(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(store, "put", put)
    pipeline = sliced.pipeline
    from embeddingcache.models import resolve_model

    call = pipeline.prepare(resolve_model(sliced.model), TEXTS, "")
    sources = []
    for part in pipeline.resolve(call):
        keys = call.distinct_keys(part.positions)
        assert len(store.lookup(sliced.model, keys).positions) == len(keys)
        sources.append((part.source, len(part.positions)))
    # Slices of 8; the last engine call's 8 as two halves of a batch each (`tapered`), so
    # that what is stored after the model is done is one batch.
    assert sources == [("computed", 8)] * 4 + [("computed", 4)] * 2
    assert writers and all(name.startswith("embeddingcache-writer") for name in writers)


@pytest.mark.parametrize(("start", "stop", "batch"), [(0, 4096, 256), (7, 300, 256), (0, 5, 8)])
def test_the_last_engine_call_tapers_to_one_batch_in_whole_batches(
    start: int, stop: int, batch: int
) -> None:
    from embeddingcache.pipeline import tapered

    ranges = tapered(start, stop, batch=batch)
    assert ranges[0][0] == start and ranges[-1][1] == stop
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    sizes = [b - a for a, b in ranges]
    assert sizes[-1] <= batch and all(size % batch == 0 for size in sizes[:-1])
    assert all(later <= earlier for earlier, later in itertools.pairwise(sizes))
    if (start, stop) == (0, 4096):
        assert sizes == [2048, 1024, 512, 256, 256]


def test_the_seconds_threshold_cuts_a_slice_after_each_engine_call_when_it_is_zero(
    sliced: EmbeddingCache,
) -> None:
    from embeddingcache.engines import EmbedOptions
    from embeddingcache.models import resolve_model
    from embeddingcache.pipeline import STEP_BATCHES

    sliced.pipeline.store_every = StoreEvery(vectors=10**6, seconds=0)
    call = sliced.pipeline.prepare(resolve_model(sliced.model), TEXTS, "")
    slices = sliced.pipeline.resolve(call, options=EmbedOptions(batch_size=2))
    step = 2 * STEP_BATCHES  # texts per engine call
    assert [len(p.positions) for p in slices] == [step, len(TEXTS) - step]


def test_a_caller_that_stops_reading_keeps_what_was_computed(sliced: EmbeddingCache) -> None:
    from embeddingcache.models import resolve_model

    call = sliced.pipeline.prepare(resolve_model(sliced.model), TEXTS, "")
    slices = sliced.pipeline.resolve(call)
    next(slices)
    slices.close()  # the second slice was computing while the first was stored
    assert stored_count(sliced, TEXTS) == 16


def test_iter_embeddings_yields_chunks_in_input_order_from_a_generator(
    sliced: EmbeddingCache, direct_model: Any
) -> None:
    pulled: list[int] = []

    def texts() -> Any:
        for i, text in enumerate(TEXTS[:20]):
            pulled.append(i)
            yield text

    chunks = sliced.iter_embeddings(texts(), chunk_size=7)
    assert pulled == []  # nothing is read before the first chunk is asked for
    first = next(chunks)
    assert first.shape == (7, 32) and len(pulled) == 7
    rest = list(chunks)
    assert [len(c) for c in rest] == [7, 6]
    np.testing.assert_array_equal(np.concatenate([first, *rest]), sliced.get_embeddings(TEXTS[:20]))
    np.testing.assert_allclose(first, direct_model.encode(TEXTS[:7], batch_size=4), atol=1e-5)


def test_iter_embeddings_names_a_bad_text_by_its_index_in_the_whole_input(
    sliced: EmbeddingCache,
) -> None:
    from embeddingcache import InvalidInputError, InvalidInputTypeError

    with pytest.raises(InvalidInputError, match=r"texts\[9\] is empty"):
        list(sliced.iter_embeddings(["a"] * 9 + [" "], chunk_size=4))
    with pytest.raises(InvalidInputTypeError, match="not a single str"):
        sliced.iter_embeddings("one text")
    with pytest.raises(InvalidInputError, match="chunk_size"):
        sliced.iter_embeddings(["a"], chunk_size=0)


MEMORY_SCRIPT = """
import sys, tracemalloc
import numpy as np
import embeddingcache
from embeddingcache import cache as cache_module, engines
from embeddingcache.keys import keys_of
from embeddingcache.models import ModelSpec


class HashEngine(engines.Engine):
    # A deterministic engine, fast enough for a corpus: the vector is the key's bytes. One
    # fixed function: no versions (the base's version() is None).
    kind = "hash"
    limits = engines.Limits(batch_inputs=256)

    def embed(self, spec, texts, *, prompt, options):
        digests = b"".join(keys_of([prompt + t for t in texts]))
        return np.frombuffer(digests, np.uint8).reshape(len(texts), 64).astype(np.float32)

    def dimension(self, spec):
        return 64


engines.register("hash", lambda settings: HashEngine())
spec = ModelSpec(name="hash-model", engine="hash", dimension=64)
cache_module.resolve_model = lambda name, **api: spec
n, directory = int(sys.argv[1]), sys.argv[2]
cache = embeddingcache.EmbeddingCache("hash-model", cache_dir=directory, remote_url=False)
texts = (f"line {i} of the corpus" for i in range(n))
chunks = cache.iter_embeddings(texts, chunk_size=2000)
total = len(next(chunks))  # imports and first allocations are not counted
tracemalloc.start()
for chunk in chunks:
    total += len(chunk)
peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
assert total == n, total
assert cache.contents().texts == n
print(peak)
"""


def peaks(script: str, tmp_path: Path, *counts: int, kind: str | None = None) -> list[int]:
    """The peak traced memory of ``script`` run over each count of texts, in fresh
    interpreters run side by side (each prints its peak last)."""
    import subprocess
    import sys

    runs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                script,
                str(n),
                str(tmp_path / f"c{n}"),
                *([kind] if kind else []),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in counts
    ]
    found: list[int] = []
    for run in runs:
        out, err = run.communicate(timeout=900)
        assert run.returncode == 0, err
        found.append(int(out.split()[-1]))
    return found


def test_iter_embeddings_memory_does_not_grow_with_the_corpus(tmp_path: Path) -> None:
    """Peak traced memory over 200,000 texts stays under a bound that does not depend on the
    count (a few chunks), and five times the texts of 40,000 add less than a chunk's worth,
    in fresh interpreters."""

    small, large = peaks(MEMORY_SCRIPT, tmp_path, 40_000, 200_000)
    chunk_bytes = 2000 * (64 * 4 + 64 + 40)  # a chunk's vectors, keys and texts
    assert large < 40 * chunk_bytes, large  # a few chunks in flight, not the corpus
    assert large - small < chunk_bytes, (small, large)


def test_the_cli_interrupted_exits_130_and_the_same_command_continues(
    tiny_model: str,
    cache_dir: Path,
    tmp_path: Path,
    fault: FailingEncode,
    capsys: pytest.CaptureFixture[str],
    direct_model: Any,
) -> None:
    from embeddingcache.cli import CHUNK, main

    lines = [f"line {i} of the file" for i in range(2 * CHUNK + 100)]
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "vectors.jsonl"
    args = ["embed", str(source), "--model", tiny_model, "--cache-dir", str(cache_dir)]
    args += ["--device", "cpu", "--out", str(out)]
    from embeddingcache.pipeline import STEP_BATCHES

    calls_per_chunk = -(-CHUNK // (32 * STEP_BATCHES))
    fault.at, fault.error = calls_per_chunk + 1, KeyboardInterrupt()  # in the second chunk
    assert main(args) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"embeddingcache: interrupted after {CHUNK} texts stored; "
        "run the same command again to continue from there"
    )
    assert len(out.read_text(encoding="utf-8").splitlines()) == CHUNK  # written as it went
    fault.at, fault.texts = None, 0
    assert main(args) == 0
    assert fault.texts == len(lines) - CHUNK  # only the rest is computed
    import json

    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [w["text"] for w in written] == lines
    np.testing.assert_allclose(
        [w["embedding"] for w in written[:5]], direct_model.encode(lines[:5]), atol=1e-5
    )


CLI_MEMORY_SCRIPT = (
    MEMORY_SCRIPT.split("n, directory =")[0]
    + """
from embeddingcache import cli
n, directory, kind = int(sys.argv[1]), sys.argv[2], sys.argv[3]
source = directory + ".txt"
with open(source, "w") as file:
    for i in range(n):
        file.write(f"line {i} of the corpus\\n")
out = {"npy": directory + ".npy", "jsonl": directory + ".jsonl", "stdout": None}[kind]
args = ["embed", source, "--model", "hash-model", "--cache-dir", directory]
if out:
    args += ["--out", out]
else:
    args += ["--format", "jsonl"]
    sys.stdout = open(directory + ".captured", "w")
tracemalloc.start()
assert cli.main(args) == 0
peak = tracemalloc.get_traced_memory()[1]
sys.stdout = sys.__stdout__
print(peak)
"""
)


@pytest.mark.parametrize("kind", ["npy", "jsonl", "stdout"])
def test_the_cli_memory_does_not_grow_with_the_lines(tmp_path: Path, kind: str) -> None:

    small, large = peaks(CLI_MEMORY_SCRIPT, tmp_path, 40_000, 200_000, kind=kind)
    assert large - small < 512 * (64 * 4 + 64 + 40) * 2, (small, large)  # two CLI chunks


def test_show_progress_draws_one_bar_for_the_whole_call_and_nothing_without_it(
    tiny_model: str, cache_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu", batch_size=4) as cache:
        cache.pipeline.store_every = StoreEvery(vectors=8, seconds=3600)  # several slices
        cache.get_embeddings(TEXTS[:20])  # the first miss loads the model, quietly
        assert capfd.readouterr().err == ""
        cache.get_embeddings(TEXTS[10:30] + TEXTS[10:12], show_progress=True)
        err = capfd.readouterr().err
    assert err.count("\n") == 1, err  # one bar, closed once; no model bar below it
    assert "Batches" not in err and "Loading" not in err
    last = err.split("\r")[-1]
    assert "22/22" in last and "text/s" in last and "hits=10, computed=10" in last, last


def test_the_model_loading_bar_shows_only_when_progress_is_asked_for(
    tiny_model: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with EmbeddingCache(tiny_model, cache_dir=tmp_path / "a", device="cpu") as cache:
        cache.get_embeddings(["one text"], show_progress=True)
    assert "Loading weights" in capfd.readouterr().err
    with EmbeddingCache(tiny_model, cache_dir=tmp_path / "b", device="cpu") as cache:
        cache.get_embeddings(["one text"])
        assert cache.stats["computed"] == 1
    assert capfd.readouterr().err == ""


def test_iter_embeddings_shows_one_bar_across_its_chunks(
    sliced: EmbeddingCache, capfd: pytest.CaptureFixture[str]
) -> None:
    sliced.get_embeddings(TEXTS[:5])
    capfd.readouterr()
    chunks = sliced.iter_embeddings(iter(TEXTS), chunk_size=7, show_progress=True)
    assert sum(len(c) for c in chunks) == len(TEXTS)
    err = capfd.readouterr().err
    assert err.count("\n") == 1, err
    assert "40text" in err.split("\r")[-1] and "hits=5, computed=35" in err, err


SIGNAL_SCRIPT = """
import atexit, sys, time
from sentence_transformers import SentenceTransformer
from embeddingcache import EmbeddingCache
from embeddingcache.pipeline import StoreEvery

model, directory, n, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
encoded = [0]
original = SentenceTransformer.encode


def encode(self, inputs, *args, **kwargs):
    # Measurement (texts encoded, said at exit) and, in the first run, a slower model, so
    # that the signal lands mid-call.
    if mode != "rest":
        time.sleep(0.05)
    vectors = original(self, inputs, *args, **kwargs)
    encoded[0] += len(inputs)
    return vectors


SentenceTransformer.encode = encode
atexit.register(lambda: print("encoded", encoded[0], flush=True))
texts = [f"text {i} of a long call" for i in range(n)]
with EmbeddingCache(model, cache_dir=directory, device="cpu", batch_size=16) as cache:
    cache.pipeline.store_every = StoreEvery(vectors=16, seconds=3600)  # a slice per call
    if mode == "iter":
        for _ in cache.iter_embeddings(iter(texts), chunk_size=64):
            pass
    else:
        cache.get_embeddings(texts)
"""


@pytest.mark.parametrize(("signal_name", "mode"), [("SIGINT", "list"), ("SIGKILL", "iter")])
def test_a_process_killed_mid_call_keeps_its_stored_slices_whole_and_a_rerun_computes_the_rest(
    tiny_model: str, cache_dir: Path, direct_model: Any, signal_name: str, mode: str
) -> None:
    """SIGINT (Ctrl-C) in a long list, SIGKILL in a generator's loop: every slice stored is
    whole, the files pass SQLite's integrity check, the vectors are the model's, and the
    same call in a new process encodes only the texts not stored."""
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    n = 1200
    texts = [f"text {i} of a long call" for i in range(n)]
    with EmbeddingCache(tiny_model, cache_dir=cache_dir) as cache:
        shard = cache._store.layout.shard_place(cache.model).path
    assert shard is not None

    def stored_rows() -> int:
        if not shard.exists():
            return 0
        try:
            with sqlite3.connect(f"file:{shard}?mode=ro", uri=True) as db:
                return int(db.execute("SELECT count(*) FROM embedding").fetchone()[0])
        except sqlite3.OperationalError:  # not created yet
            return 0

    def run(run_mode: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", SIGNAL_SCRIPT, tiny_model, str(cache_dir), str(n), run_mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # One torch thread: on a busy machine, torch's thread pool made each of the tiny
            # model's operations wait a scheduler slice (18 s for this, instead of 0.6).
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    child = run(mode)
    deadline = time.monotonic() + 120
    while stored_rows() < 32:
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "no slice was stored in time"
        time.sleep(0.02)
    child.send_signal(getattr(signal, signal_name))
    out, err = child.communicate(timeout=60)
    assert child.returncode != 0, (out, err)  # stopped mid-call, not finished
    stored = stored_rows()
    assert 32 <= stored < n and stored % 16 == 0, stored  # whole slices only
    if signal_name == "SIGINT":
        assert "KeyboardInterrupt" in err, err
        assert out.split() == ["encoded", str(stored)]  # all it computed, it stored
    for name in ("hashstring.db", shard.name):
        with sqlite3.connect(cache_dir / name) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        found = cache._store.lookup(cache.model, keys_of(texts))
    assert len(found.positions) == stored and not len(found.damaged)
    np.testing.assert_allclose(
        found.vectors[:64],
        direct_model.encode([texts[i] for i in found.positions[:64]], batch_size=16),
        atol=1e-5,
    )
    rest = run(mode)
    out, err = rest.communicate(timeout=120)
    assert rest.returncode == 0, err
    assert out.split() == ["encoded", str(n - stored)]  # only the rest


def test_a_static_embedding_model_is_computed_once_and_read_back_as_encoded(
    static_model: str, cache_dir: Path, encode_spy: Any
) -> None:
    """The benchmarks' fast model (tests/tiny_model.py) goes through the real path too."""
    from sentence_transformers import SentenceTransformer

    texts = [f"cold text {i} of the corpus" for i in range(3000)]
    with EmbeddingCache(static_model, cache_dir=cache_dir, device="cpu") as cache:
        cache.pipeline.store_every = StoreEvery(vectors=1000, seconds=3600)
        vectors = cache.get_embeddings(texts, batch_size=256)
        assert len(encode_spy.texts) == len(texts)
        np.testing.assert_array_equal(cache.get_embeddings(texts), vectors)
        assert len(encode_spy.texts) == len(texts)  # all read back
    bare = SentenceTransformer(static_model, device="cpu").encode(texts, batch_size=256)
    assert vectors.shape == (3000, 256)
    np.testing.assert_allclose(vectors, bare, atol=1e-6)
