"""Reliability under many writers and crashes: nothing lost, nothing wrong ever returned.

The many-writer and crash tests run real processes against one cache (SQLite files, and
Postgres where it runs) and are marked ``stress``: ``pytest -m "not stress"`` leaves them out of
a quick run; CI runs them.

A batch's composition moves a vector's last bits (up to 2.4e-7 on the tiny model), so these
tests hand the texts over in fixed chunks of 100, each chunk the same list in every process, in
a different order per process. A chunk's vectors are stored in one transaction, so a process
finds a chunk either all stored or not at all and computes whole chunks only: the same batches
as a single process computing them, which the tests then match bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from embeddingcache import EmbeddingCache, EmbeddingCacheWarning, InvalidInputError, StorageError
from embeddingcache.keys import key_of
from embeddingcache.pipeline import STEP_BATCHES

ROOT = Path(__file__).resolve().parent.parent

WRITERS = 8
PER_WRITER = 5000  # half of them shared by every writer, half its own
CHUNK = 100

# argv: model, storage (JSON), start flag ("" to start at once), a JSON file of chunks, seed
WRITER = """
import json, random, sys, time
from pathlib import Path
from embeddingcache import EmbeddingCache

model, storage, start_flag, chunks, seed = sys.argv[1:6]
chunks = json.loads(Path(chunks).read_text(encoding="utf-8"))
random.Random(int(seed)).shuffle(chunks)
with EmbeddingCache(model, device="cpu", **json.loads(storage)) as cache:
    cache.dimension()  # load the model before the start
    while start_flag and not Path(start_flag).exists():
        time.sleep(0.01)
    for chunk in chunks:
        cache.get_embeddings(chunk)
    print(json.dumps(cache.stats))
"""


def python_env() -> dict[str, str]:
    # One thread per process: eight writers on two cores, and the same arithmetic in each.
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def chunked(texts: list[str]) -> list[list[str]]:
    return [texts[i : i + CHUNK] for i in range(0, len(texts), CHUNK)]


def shared_chunks() -> list[list[str]]:
    return chunked([f"shared text {j}" for j in range(PER_WRITER // 2)])


def own_chunks(number: int) -> list[list[str]]:
    return chunked([f"writer {number} text {j} " + "x" * (j % 13) for j in range(PER_WRITER // 2)])


def writer(
    model: str, storage: dict[str, Any], start_flag: str, chunks: list[list[str]], seed: int
) -> subprocess.Popen[str]:
    """A process storing ``chunks`` (in an order from ``seed``), once ``start_flag`` exists."""
    fd, name = tempfile.mkstemp(suffix=".json")  # too long for a command line
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        json.dump(chunks, file)
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WRITER,
            model,
            json.dumps(storage, default=str),
            start_flag,
            name,
            str(seed),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=python_env(),
    )
    process.args_file = name  # type: ignore[attr-defined]
    return process


def finished(process: subprocess.Popen[str]) -> dict[str, int]:
    out, err = process.communicate(timeout=900)
    os.unlink(process.args_file)  # type: ignore[attr-defined]
    assert process.returncode == 0, err
    assert "Traceback" not in err and "EmbeddingCacheWarning" not in err, err
    stats: dict[str, int] = json.loads(out)
    return stats


def stored_vectors(model: str, storage: dict[str, Any], texts: list[str]) -> np.ndarray:
    with EmbeddingCache(model, device="cpu", **storage) as cache:
        vectors = cache.get_embeddings(texts)
        assert cache.stats["computed"] == 0
    return vectors


@pytest.mark.stress
def test_eight_processes_writing_one_cache_store_each_text_once_and_exactly(
    tiny_model: str, storage: dict[str, Any], tmp_path: Path
) -> None:
    """8 processes x 5,000 texts, half shared: no error, each text stored once, every vector
    bit-identical to a single-process run."""
    start_flag = tmp_path / "go"
    shared = shared_chunks()
    writers = [
        writer(tiny_model, storage, str(start_flag), shared + own_chunks(n), seed=n)
        for n in range(WRITERS)
    ]
    start_flag.touch()
    stats = [finished(w) for w in writers]
    assert all(s["hits"] + s["misses"] == PER_WRITER for s in stats)

    every_chunk = shared + [c for n in range(WRITERS) for c in own_chunks(n)]
    texts = [t for chunk in every_chunk for t in chunk]
    alone = {"cache_dir": str(tmp_path / "single-process")}
    finished(writer(tiny_model, alone, "", every_chunk, seed=0))

    with EmbeddingCache(tiny_model, device="cpu", **storage) as cache:
        contents = cache.contents()
        assert contents.texts == len(texts) == 22_500
        assert [s.entries for s in contents.shards] == [len(texts)]
        place = cache._store.layout.text_place()
        with place.engine.connect() as connection:
            rows = connection.execute(select(place.hashstring)).all()
            distinct = connection.scalar(
                select(func.count(func.distinct(place.hashstring.c.hashid)))
            )
    assert distinct == len(rows) == len(texts)
    assert all(key_of(text) == hashid for hashid, text in rows)
    many = stored_vectors(tiny_model, storage, texts)
    assert many.tobytes() == stored_vectors(tiny_model, alone, texts).tobytes()


CRASHER = """
import json, sys
from embeddingcache import EmbeddingCache

model, cache_dir = sys.argv[1], sys.argv[2]
chunks = json.loads(open(sys.argv[3], encoding="utf-8").read())
with EmbeddingCache(model, cache_dir=cache_dir, device="cpu") as cache:
    cache.dimension()
    print("ready", flush=True)
    for chunk in chunks:
        cache.get_embeddings(chunk)
"""


@pytest.mark.stress
def test_a_writer_killed_at_random_moments_never_leaves_a_damaged_cache(
    tiny_model: str, cache_dir: Path, tmp_path: Path
) -> None:
    """Up to 20 SIGKILLs mid-write: every file passes integrity_check, no vector is partial,
    and the next run completes the work, its vectors exact. The kills stop once most of the
    work is stored, so that a fast machine still leaves some for the next run."""
    rng = random.Random(7)
    chunks = chunked([f"crash text {j} " + "y" * (j % 11) for j in range(20_000)])
    for _ in range(20):
        if stored_entries(cache_dir) >= 15_000:
            break
        todo = chunks[:]
        rng.shuffle(todo)
        order = tmp_path / "order.json"
        order.write_text(json.dumps(todo), encoding="utf-8")
        crasher = subprocess.Popen(
            [sys.executable, "-c", CRASHER, tiny_model, str(cache_dir), str(order)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=python_env(),
        )
        assert crasher.stdout is not None
        assert crasher.stdout.readline().strip() == "ready"
        # A writer stores about 2,000 texts a second here: each round does a few hundred.
        time.sleep(rng.uniform(0.05, 0.4))
        crasher.send_signal(signal.SIGKILL)
        crasher.communicate(timeout=60)
        assert crasher.returncode == -signal.SIGKILL
        for file in cache_dir.glob("*.db"):
            with sqlite3.connect(file) as db:
                assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)], file
                tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
                # A kill while a new file is set up leaves it without tables: its creation
                # was one transaction, rolled back, and the next writer sets it up.
                if "embedding" in tables:
                    lengths = db.execute("SELECT DISTINCT length(vector) FROM embedding")
                    assert lengths.fetchall() in ([], [(4 * 32,)]), file
    storage = {"cache_dir": str(cache_dir)}
    with EmbeddingCache(tiny_model, **storage) as cache:
        before = cache.contents().shards[0].entries
    assert 0 < before < 20_000
    # The next run completes the work: the missing chunks, whole.
    after = finished(writer(tiny_model, storage, "", chunks, seed=1))
    assert after["computed"] == 20_000 - before
    alone = {"cache_dir": str(tmp_path / "single-process")}
    finished(writer(tiny_model, alone, "", chunks, seed=1))
    texts = [t for chunk in chunks for t in chunk]
    assert (
        stored_vectors(tiny_model, storage, texts).tobytes()
        == stored_vectors(tiny_model, alone, texts).tobytes()
    )


def stored_entries(cache_dir: Path) -> int:
    """How many vectors the cache's one shard holds, read with sqlite3 (0: none yet)."""
    total = 0
    for file in cache_dir.glob("*.db"):
        with sqlite3.connect(file) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
            if "embedding" in tables:
                total += db.execute("SELECT count(*) FROM embedding").fetchone()[0]
    return total


# -- storage faults ---------------------------------------------------------------------------
# Faults come from SQLite and Postgres themselves, switched on by a pragma or a terminated
# connection on the cache's own connections (root ignores file permissions, and the disk of a
# test machine is not ours to fill).

FAULTS = {
    # A page limit at the file's current size: SQLITE_FULL, as on a full disk.
    "full": ("database or disk is full", "PRAGMA max_page_count = {pages}"),
    # The connection refuses writes: as on a file system remounted read-only.
    "read-only": ("readonly database", "PRAGMA query_only = 1"),
}
HEALED = ("PRAGMA max_page_count = 1073741823", "PRAGMA query_only = 0")


def inject(cache: EmbeddingCache, pragma: str | None) -> None:
    """Run ``pragma`` on every connection the cache's writers check out from now on
    (``None``: undo every fault)."""
    from sqlalchemy import event

    layout = cache._store.layout
    places = [layout.text_place(), *layout.shard_places()]
    for place in places:
        engine = place.engine
        for listener in getattr(engine, "_faults", []):
            event.remove(engine.pool, "checkout", listener)
        engine._faults = []  # type: ignore[attr-defined]
        if place.path is None:
            continue
        with sqlite3.connect(place.path) as db:
            pages = db.execute("PRAGMA page_count").fetchone()[0]
        statements = [pragma.format(pages=pages)] if pragma else list(HEALED)

        def checkout(
            dbapi: Any, record: Any, proxy: Any, statements: list[str] = statements
        ) -> None:
            for statement in statements:
                dbapi.execute(statement)

        event.listen(engine.pool, "checkout", checkout)
        engine._faults.append(checkout)  # type: ignore[attr-defined]


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_storage_fault_mid_run_returns_computed_vectors_and_heals_by_itself(
    tiny_model: str, cache_dir: Path, fault: str, direct_model: Any
) -> None:
    """A full or read-only store after it worked: the call returns the right vectors with a
    warning, nothing half-written is read back, and the next call after the fault stores them."""
    reason, pragma = FAULTS[fault]
    before = [f"before {i}" for i in range(50)]
    during = [f"during the fault, text number {i}" for i in range(600)]
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        cache.get_embeddings(before)
        inject(cache, pragma)
        with pytest.warns(EmbeddingCacheWarning, match=f"could not store [0-9]+ .*{reason}"):
            vectors = cache.get_embeddings(during)
        # The model is called STEP_BATCHES batches at a time: each call's texts are one
        # encode(), bit for bit.
        step = cache.batch_size * STEP_BATCHES
        for start in range(0, len(during), step):
            assert np.array_equal(
                vectors[start : start + step],
                direct_model.encode(during[start : start + step]),  # type: ignore[attr-defined]
            )
        np.testing.assert_array_equal(
            cache.get_embeddings(before),
            direct_model.encode(before),  # type: ignore[attr-defined]
        )
        for file in cache_dir.glob("*.db"):
            with sqlite3.connect(file) as db:
                assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert cache.contents().shards[0].entries == 50
        inject(cache, None)
        computed = cache.stats["computed"]
        again = cache.get_embeddings(during)
        assert cache.stats["computed"] == computed + 600
        assert np.array_equal(again, vectors)
        cache.get_embeddings(during)
        assert cache.stats["computed"] == computed + 600
        assert cache.contents().shards[0].entries == 650


def test_a_store_that_never_worked_is_one_clear_error(tiny_model: str, cache_dir: Path) -> None:
    """Misconfigured storage (here read-only from the first write) fails the call clearly."""
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        cache._store.put("other", [key_of("x")], ["x"], np.ones((1, 4), np.float32))
        inject(cache, "PRAGMA query_only = 1")
        with pytest.raises(StorageError, match=r"cannot write to the cache at .*readonly"):
            cache.get_embeddings(["never stored"])


def test_a_postgres_connection_dropped_mid_batch_is_retried_without_loss(
    tiny_model: str, pg_url: str
) -> None:
    """The server ends the cache's connection in the middle of its writes: the batch is
    retried on a new connection, and every vector is stored once."""
    from sqlalchemy import event

    texts = [f"dropped {i}" for i in range(300)]
    with EmbeddingCache(tiny_model, db_url=pg_url, device="cpu") as cache:
        cache.get_embeddings(["first"])
        engine = cache._store.layout.text_place().engine
        dropped: list[int] = []

        def drop(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if statement.lstrip().upper().startswith("INSERT") and len(dropped) < 3:
                dropped.append(1)
                cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")

        event.listen(engine, "before_cursor_execute", drop)
        vectors = cache.get_embeddings(texts)
        event.remove(engine, "before_cursor_execute", drop)
        assert len(dropped) == 3
        assert cache.contents().shards[0].entries == 301
        assert np.array_equal(cache.get_embeddings(texts), vectors)
        assert cache.stats["computed"] == 301


def test_a_postgres_database_away_for_longer_than_the_retries_degrades_then_heals(
    tiny_model: str, pg_url: str
) -> None:
    """Every write fails for a while: the call returns computed vectors with a warning; once
    the database answers again, the next call stores them."""
    from sqlalchemy import event

    texts = [f"away {i}" for i in range(40)]
    with EmbeddingCache(tiny_model, db_url=pg_url, device="cpu") as cache:
        expected = cache.get_embeddings(["first", *texts])[1:]
        cache.prune(model=tiny_model)
        engine = cache._store.layout.text_place().engine

        def drop(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if statement.lstrip().upper().startswith("INSERT"):
                cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")

        event.listen(engine, "before_cursor_execute", drop)
        with pytest.warns(EmbeddingCacheWarning, match="could not store 40"):
            vectors = cache.get_embeddings(texts)
        event.remove(engine, "before_cursor_execute", drop)
        np.testing.assert_allclose(vectors, expected, atol=1e-6)
        assert cache.contents().texts == 0
        cache.get_embeddings(texts)
        assert cache.contents().shards[0].entries == 40


# -- hostile model names ------------------------------------------------------------------------

HOSTILE_NAMES = [
    "../escape",
    "../../../../etc/passwd",
    "/absolute/path/model",
    "C:\\Windows\\model",
    "a/b/c",
    "..",
    ".",
    ".hidden",
    "hashstring",
    "CON",
    "nul.txt",
    "x" * 5000,
    "x" * 4999 + "y",
    "Model",
    "model",
    "MODEL",
    "mo-del",
    "mo_del",
    "mo.del",
    "mo del",
    "mo/del",
    "emoji \U0001f916",
    "trailing.",
    "trailing ",
]


def test_hostile_model_names_stay_inside_the_cache_and_never_share_a_shard(
    any_store: Any, storage: dict[str, Any], tmp_path: Path
) -> None:
    """Separators, .., absolute paths, 5,000-character names and names that differ only by
    case or punctuation: every file inside the cache directory, one shard per name."""
    outside_before = sorted(p for p in tmp_path.rglob("*") if "cache" not in p.parts)
    for number, name in enumerate(HOSTILE_NAMES):
        vector = np.full((1, 4), float(number), np.float32)
        any_store.put(name, [key_of("the same text")], ["the same text"], vector)
    for number, name in enumerate(HOSTILE_NAMES):
        found = any_store.lookup(name, [key_of("the same text")])
        assert found.vectors.tolist() == [[float(number)] * 4], name
    summaries = any_store.summaries()
    assert sorted(s.model for s in summaries) == sorted(HOSTILE_NAMES)
    assert len({s.place for s in summaries}) == len(HOSTILE_NAMES)
    if "cache_dir" in storage:
        cache_dir = Path(storage["cache_dir"]).resolve()
        files = list(cache_dir.rglob("*"))
        assert all(f.parent == cache_dir and f.is_file() for f in files)
        assert all(len(f.name.encode()) <= 255 for f in files)
        assert sorted(p for p in tmp_path.rglob("*") if "cache" not in p.parts) == outside_before


@pytest.mark.parametrize("name", ["nul\x00byte", "lone \ud800 surrogate", "", "   "])
def test_a_model_name_no_table_can_record_is_refused_clearly(any_store: Any, name: str) -> None:
    """NUL, a lone surrogate or nothing at all: InvalidInputError, and nothing written."""
    with pytest.raises(InvalidInputError, match="model"):
        any_store.put(name, [key_of("t")], ["t"], np.ones((1, 4), np.float32))
    assert any_store.summaries() == []
