"""Storage guards and repairs, on real SQLite files."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import EncodeSpy
from sqlalchemy import exc as sa_exc

from embeddingcache import (
    DimensionMismatchError,
    EmbeddingCache,
    EmbeddingCacheWarning,
    ShardMismatchError,
    StorageError,
)
from embeddingcache.keys import key_of, model_slug
from embeddingcache.storage import SQLiteLayout, Store, retry, sqlite
from embeddingcache.storage.store import Store as StoreClass


def shard_file(cache_dir: Path, model: str) -> Path:
    return cache_dir / f"{model_slug(model)}.db"


def vectors(n: int, dim: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def test_shards_use_wal_and_a_busy_timeout(cache: EmbeddingCache, cache_dir: Path) -> None:
    cache.get_embeddings(["x"])
    for path in cache_dir.glob("*.db"):
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    engine = cache._store.layout.text_place().engine
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000


def test_the_hit_path_only_reads(
    tiny_model: str, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [f"read only {i}" for i in range(10)]
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as first:
        first.get_embeddings(texts)
    files = sorted(cache_dir.glob("*.db*"))
    before = {f: f.read_bytes() for f in files if not f.name.endswith("-shm")}
    statements: list[str] = []
    connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        connection = connect(*args, **kwargs)
        connection.set_trace_callback(statements.append)
        return connection

    monkeypatch.setattr(sqlite3, "connect", traced)
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as again:
        again.get_embeddings(texts)
        again.get_embeddings(texts[3])
        assert again.stats["hits"] == 11
        assert {f: f.read_bytes() for f in before} == before
    assert any(s.startswith("SELECT hashid, vector") for s in statements), statements
    assert all(s.lstrip().upper().startswith(("SELECT", "PRAGMA")) for s in statements), statements
    # Closing adds the counts in one write; the first cache's 10 misses are there too.
    with sqlite3.connect(shard_file(cache_dir, tiny_model)) as db:
        assert db.execute("SELECT hits, misses FROM model_info").fetchall() == [(11, 10)]


def test_a_damaged_vector_is_a_miss_recomputed_and_replaced(
    cache: EmbeddingCache, cache_dir: Path, tiny_model: str, encode_spy: EncodeSpy
) -> None:
    original = cache.get_embeddings(["fine", "to be damaged"])
    with sqlite3.connect(shard_file(cache_dir, tiny_model)) as db:
        db.execute(
            "UPDATE embedding SET vector = substr(vector, 1, 10) WHERE hashid = ?",
            (key_of("to be damaged"),),
        )
    encode_spy.calls.clear()
    with pytest.warns(EmbeddingCacheWarning, match="1 stored vector.*wrong length"):
        repaired = cache.get_embeddings(["fine", "to be damaged"])
    assert encode_spy.texts == ["to be damaged"]
    np.testing.assert_allclose(repaired, original, atol=1e-6)
    with sqlite3.connect(shard_file(cache_dir, tiny_model)) as db:
        assert db.execute("SELECT DISTINCT length(vector) FROM embedding").fetchall() == [(128,)]
    encode_spy.calls.clear()
    cache.get_embeddings(["to be damaged"])
    assert encode_spy.calls == []


def test_an_unreadable_shard_file_is_moved_aside_and_recreated(
    tiny_model: str, cache_dir: Path
) -> None:
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as first:
        expected = first.get_embeddings(["survives"])
    shard = shard_file(cache_dir, tiny_model)
    for sidecar in cache_dir.glob("*-wal"):
        sidecar.unlink()
    garbage = b"this is not a database" * 100
    shard.write_bytes(garbage)
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as second:
        with pytest.warns(EmbeddingCacheWarning, match="not a readable SQLite database"):
            again = second.get_embeddings(["survives"])
        assert second.stats["computed"] == 1
    np.testing.assert_allclose(again, expected, atol=1e-6)
    moved = list(cache_dir.glob(f"{shard.name}.corrupt-*"))
    assert [p.read_bytes() for p in moved if not p.name.endswith(("-wal", "-shm"))] == [garbage]
    with sqlite3.connect(shard) as db:
        assert db.execute("SELECT count(*) FROM embedding").fetchone() == (1,)


def test_an_unreadable_hashstring_file_is_moved_aside_and_recreated(
    cache: EmbeddingCache, cache_dir: Path
) -> None:
    cache_dir.mkdir(parents=True)
    (cache_dir / "hashstring.db").write_bytes(b"\x00garbage" * 500)
    with pytest.warns(EmbeddingCacheWarning, match="hashstring.db is not a readable"):
        cache.get_embeddings(["new text"])
    assert len(list(cache_dir.glob("hashstring.db.corrupt-*"))) == 1
    with sqlite3.connect(cache_dir / "hashstring.db") as db:
        assert db.execute("SELECT text FROM hashstring").fetchall() == [("new text",)]


def test_two_models_whose_slugs_collide_never_share_a_shard(
    cache: EmbeddingCache, tiny_model: str, cache_dir: Path
) -> None:
    cache.get_embeddings(["owned by the tiny model"])
    impostor = model_slug(tiny_model)  # a clean name equal to the tiny model's slug
    assert impostor != tiny_model and model_slug(impostor) == model_slug(tiny_model)
    with pytest.raises(ShardMismatchError, match="belongs to model"):
        cache.get_embeddings(["owned by the tiny model"], impostor)
    store = Store(SQLiteLayout(cache_dir))
    with pytest.raises(ShardMismatchError):
        store.put(impostor, [key_of("z")], ["z"], vectors(1, 32))
    store.close()
    with sqlite3.connect(shard_file(cache_dir, tiny_model)) as db:
        assert db.execute("SELECT model FROM model_info").fetchall() == [(tiny_model,)]
        assert db.execute("SELECT count(*) FROM embedding").fetchone() == (1,)


def test_a_vector_of_another_dimension_is_refused(any_store: Store) -> None:
    store = any_store
    store.put("m", [key_of("a")], ["a"], vectors(1, 4))
    with pytest.raises(DimensionMismatchError, match=r"gave 5-d vectors.*holds 4-d"):
        store.put("m", [key_of("b")], ["b"], vectors(1, 5))
    assert len(store.lookup("m", [key_of("a"), key_of("b")]).positions) == 1


def test_non_finite_vectors_are_never_stored(any_store: Store) -> None:
    store = any_store
    bad = vectors(2)
    bad[1, 2] = np.nan
    with pytest.raises(StorageError, match="NaN or infinite"):
        store.put("m", [key_of("a"), key_of("b")], ["a", "b"], bad)
    assert store.info("m") is None


def test_inserts_are_idempotent_and_keep_the_first_vector(any_store: Store) -> None:
    store = any_store
    first, second = vectors(1, seed=1), vectors(1, seed=2)
    store.put("m", [key_of("a")], ["a"], first)
    store.put("m", [key_of("a")], ["a"], second)
    found = store.lookup("m", [key_of("a")])
    np.testing.assert_array_equal(found.vectors, first)


@pytest.mark.parametrize(
    "name",
    ["../../escape", "/etc/evil", "..", "a/../../b", "sub/dir/model", "x" * 3000, "hashstring"],
)
def test_model_names_never_put_a_file_outside_the_cache_directory(
    tmp_path: Path, name: str
) -> None:
    cache_dir = tmp_path / "inner" / "cache"
    store = Store(SQLiteLayout(cache_dir))
    store.put(name, [key_of("t")], ["t"], vectors(1))
    assert store.info(name) is not None and store.info(name).model == name  # type: ignore[union-attr]
    store.close()
    outside = [p for p in tmp_path.rglob("*") if cache_dir not in p.parents and p != cache_dir]
    assert all(p in cache_dir.parents for p in outside), outside
    assert {p.name for p in cache_dir.iterdir()} >= {"hashstring.db", f"{model_slug(name)}.db"}


def test_transient_lock_errors_are_retried(
    any_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = any_store
    real = StoreClass._put_vectors
    attempts = []

    def flaky(self: Store, *args: Any, **kwargs: Any) -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise sa_exc.OperationalError(
                "INSERT", {}, sqlite3.OperationalError("database is locked")
            )
        real(self, *args, **kwargs)

    monkeypatch.setattr(StoreClass, "_put_vectors", flaky)
    store.put("m", [key_of("a")], ["a"], vectors(1))
    assert len(attempts) == 3
    assert len(store.lookup("m", [key_of("a")]).positions) == 1


def test_other_write_errors_are_not_retried(
    any_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = any_store
    attempts = []

    def broken(self: Store, *args: Any, **kwargs: Any) -> None:
        attempts.append(1)
        raise sa_exc.OperationalError("INSERT", {}, sqlite3.OperationalError("disk I/O error"))

    monkeypatch.setattr(StoreClass, "_put_vectors", broken)
    with pytest.raises(StorageError, match="disk I/O error"):
        store.put("m", [key_of("a")], ["a"], vectors(1))
    assert attempts == [1]


def test_a_writer_waits_out_another_process_holding_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite, "BUSY_TIMEOUT_S", 0.05)
    monkeypatch.setattr(retry, "WAIT_SCALE", 1.0)
    store = Store(SQLiteLayout(tmp_path))
    store.put("m", [key_of("a")], ["a"], vectors(1))
    holder = sqlite3.connect(
        tmp_path / f"{model_slug('m')}.db", isolation_level=None, check_same_thread=False
    )
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.6, holder.execute, args=("COMMIT",))
    release.start()
    started = time.monotonic()
    store.put("m", [key_of("b")], ["b"], vectors(1, seed=3))
    assert time.monotonic() - started >= 0.5
    release.join()
    holder.close()
    assert len(store.lookup("m", [key_of("a"), key_of("b")]).positions) == 2
    store.close()


def test_closing_the_cache_while_other_threads_read_is_safe(
    tiny_model: str, cache_dir: Path
) -> None:
    """A read in flight finishes before its connection is closed (closing it under the read
    crashed the process), and the next read opens a new one."""
    script = f"""
import threading
from embeddingcache import EmbeddingCache
cache = EmbeddingCache({tiny_model!r}, cache_dir={str(cache_dir)!r}, device="cpu")
texts = [f"text {{i}}" for i in range(600)]
expected = cache.get_embeddings(texts)
stop = threading.Event()
errors = []
def read():
    while not stop.is_set():
        try:
            assert (cache.get_embeddings(texts) == expected).all()
        except Exception as exc:
            errors.append(exc)
threads = [threading.Thread(target=read) for _ in range(4)]
for t in threads:
    t.start()
for _ in range(300):
    cache.close()
stop.set()
for t in threads:
    t.join()
assert not errors, errors[:3]
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


def test_a_shard_removed_by_another_process_is_a_miss_then_recreated(
    tiny_model: str, cache_dir: Path, encode_spy: EncodeSpy
) -> None:
    # No memory tier: it would answer with the vector it read (still the right one), where
    # this test is about a reader that meets the missing file.
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu", memory_size=0) as cache:
        first = cache.get_embeddings(["kept"])
        for path in cache_dir.glob(shard_file(cache_dir, tiny_model).name + "*"):
            path.unlink()
        results: list[Any] = []
        # A thread with no connection yet meets the missing file.
        worker = threading.Thread(target=lambda: results.append(cache.get_embeddings(["kept"])))
        worker.start()
        worker.join()
        np.testing.assert_array_equal(results[0], first)
        assert cache.stats["computed"] == 2
        assert shard_file(cache_dir, tiny_model).exists()
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as again:
        again.get_embeddings(["kept"])
        assert again.stats["hits"] == 1


def test_a_shard_file_removed_by_another_process_is_recreated_before_the_next_write(
    tmp_path: Path,
) -> None:
    """The writer's open connections hold the unlinked file: the next write goes to a new one
    on disk, with its tables, where a fresh cache finds it."""
    store = Store(SQLiteLayout(tmp_path))
    store.put("m", [key_of("first")], ["first"], vectors(1))
    assert store.lookup("m", [key_of("first")]).positions.tolist() == [0]
    shard = tmp_path / f"{model_slug('m')}.db"
    for removed in (shard, tmp_path / "hashstring.db"):
        for file in tmp_path.glob(f"{removed.name}*"):  # the file, its -wal and -shm
            file.unlink()
    second = vectors(1, seed=1)
    store.put("m", [key_of("second")], ["second"], second)
    assert store.lookup("m", [key_of("second")]).positions.tolist() == [0]
    store.close()
    fresh = Store(SQLiteLayout(tmp_path))
    found = fresh.lookup("m", [key_of("first"), key_of("second")])
    assert found.positions.tolist() == [1]
    np.testing.assert_array_equal(found.vectors, second)
    assert fresh.text_count() == 1
    fresh.close()


def test_use_counted_after_another_process_replaced_the_shard_goes_to_the_new_file(
    tmp_path: Path,
) -> None:
    """A flush checks the file too: the counts are not written to the unlinked shard."""
    store = Store(SQLiteLayout(tmp_path))
    store.put("m", [key_of("first")], ["first"], vectors(1))
    shard = tmp_path / f"{model_slug('m')}.db"
    for file in tmp_path.glob(f"{shard.name}*"):
        file.unlink()
    other = Store(SQLiteLayout(tmp_path))  # another process stores the shard anew
    other.put("m", [key_of("second")], ["second"], vectors(1, seed=1))
    other.close()
    store.record("m", hits=5, misses=2)
    store.flush()
    store.close()
    with sqlite3.connect(shard) as db:
        assert db.execute("SELECT hits, misses FROM model_info").fetchone() == (5, 2)
