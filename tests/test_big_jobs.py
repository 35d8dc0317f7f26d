"""Big jobs (issue 17): a call stores its computed vectors in slices as it goes, so an
interrupt keeps every completed slice and a second run computes only the rest."""

from __future__ import annotations

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
    assert sources == [("computed", 8)] * 5
    assert writers and all(name.startswith("embeddingcache-writer") for name in writers)


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


class HashEngine:
    # A deterministic engine, fast enough for a corpus: the vector is the key's bytes.
    kind = "hash"
    limits = engines.Limits(batch_inputs=256)
    versioned_by = "weights"

    def version(self, spec, *, fresh=False):
        return None  # one fixed function: no versions

    def embed(self, spec, texts, *, prompt, options):
        digests = b"".join(keys_of([prompt + t for t in texts]))
        return np.frombuffer(digests, np.uint8).reshape(len(texts), 64).astype(np.float32)

    def count_tokens(self, spec, texts):
        return None

    def dimension(self, spec):
        return 64

    def close(self):
        pass


engines.register("hash", lambda settings: HashEngine())
spec = ModelSpec(name="hash-model", engine="hash", dimension=64)
cache_module.resolve_model = lambda name: spec
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


def test_iter_embeddings_memory_does_not_grow_with_the_corpus(tmp_path: Path) -> None:
    """Peak traced memory over 60,000 texts stays under a bound that does not depend on the
    count (a few chunks), and five times the texts of 12,000 add less than a chunk's worth,
    in fresh interpreters."""
    import subprocess
    import sys

    def peak(n: int) -> int:
        done = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, str(n), str(tmp_path / f"c{n}")],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])

    small, large = peak(12_000), peak(60_000)
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
    import subprocess
    import sys

    def peak(n: int) -> int:
        done = subprocess.run(
            [sys.executable, "-c", CLI_MEMORY_SCRIPT, str(n), str(tmp_path / f"c{n}"), kind],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])

    small, large = peak(6_000), peak(30_000)
    assert large - small < 512 * (64 * 4 + 64 + 40) * 2, (small, large)  # two CLI chunks
