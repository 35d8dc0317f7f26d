"""The memory tier (issue 32): a repeated text is served from memory, within a budget of bytes,
and never once its vector may be wrong: after a prune, a model version change, a shard of
another dimension, or ``close``."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embeddingcache import EmbeddingCache
from embeddingcache.errors import InvalidInputError
from embeddingcache.keys import keys_of, model_slug
from embeddingcache.storage import Store, layout_for
from embeddingcache.storage.memory import DEFAULT_MEMORY_SIZE, ENTRY_OVERHEAD, Memory, Remembered

TEXT = "a query users send again and again"


def _remove_stored_vectors(cache_dir: Path, model: str) -> None:
    """Delete every vector of the model's shard behind the cache's back (another process)."""
    with sqlite3.connect(cache_dir / f"{model_slug(model)}.db") as connection:
        connection.execute("DELETE FROM embedding")


def test_a_repeated_text_is_served_from_memory_once_read(
    tiny_model: str, cache_dir: Path, encode_spy: Any
) -> None:
    """A text read once is served again from memory: its row deleted on disk, still a hit."""
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        first = cache.get_embeddings([TEXT])
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        np.testing.assert_array_equal(cache.get_embeddings([TEXT]), first)  # read: remembered
        _remove_stored_vectors(cache_dir, tiny_model)
        computed = len(encode_spy.texts)
        np.testing.assert_array_equal(cache.get_embeddings([TEXT]), first)
        assert len(encode_spy.texts) == computed
        assert cache.stats["hits"] == 2 and cache.stats["misses"] == 0


def test_a_text_stored_by_a_call_is_remembered_and_its_copy_is_the_callers(
    tiny_model: str, cache_dir: Path
) -> None:
    """A computed text fills memory; a caller changing its array changes no later answer."""
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        computed = cache.get_embeddings(TEXT)
        expected = computed.copy()
        computed[:] = 0
        _remove_stored_vectors(cache_dir, tiny_model)
        again = cache.get_embeddings([TEXT], normalize_embeddings=True)
        np.testing.assert_allclose(again[0], expected / np.linalg.norm(expected), rtol=1e-6)
        np.testing.assert_array_equal(cache.get_embeddings(TEXT), expected)
        assert cache.stats["computed"] == 1


def test_memory_size_zero_turns_the_tier_off(
    tiny_model: str, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no memory, a vector deleted on disk is computed again, from the setting or its
    environment variable."""
    monkeypatch.setenv("EMBEDDING_CACHE_MEMORY_SIZE", "0")
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        assert cache.memory_size == 0
        cache.get_embeddings([TEXT])
        _remove_stored_vectors(cache_dir, tiny_model)
        cache.get_embeddings([TEXT])
        assert cache.stats["computed"] == 2
    monkeypatch.delenv("EMBEDDING_CACHE_MEMORY_SIZE")
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, memory_size=0) as cache:
        assert cache.memory_size == 0
    with EmbeddingCache(tiny_model, cache_dir=cache_dir) as cache:
        assert cache.memory_size == DEFAULT_MEMORY_SIZE


@pytest.mark.parametrize("bad", [-1, 1.5, "4MiB", True])
def test_a_memory_size_that_is_not_a_count_of_bytes_is_refused(
    tiny_model: str, cache_dir: Path, bad: Any
) -> None:
    """memory_size takes an int >= 0, and says so."""
    with pytest.raises(InvalidInputError, match="memory_size"):
        EmbeddingCache(tiny_model, cache_dir=cache_dir, memory_size=bad)


def test_a_pickled_cache_keeps_its_memory_size(tiny_model: str, cache_dir: Path) -> None:
    """The setting travels with the cache's configuration."""
    import pickle

    with EmbeddingCache(tiny_model, cache_dir=cache_dir, memory_size=12345) as cache:
        copy = pickle.loads(pickle.dumps(cache))
        assert copy.memory_size == 12345


@pytest.mark.parametrize("by", ["model", "max_size"])
def test_prune_leaves_nothing_in_memory(
    tiny_model: str, cache_dir: Path, encode_spy: Any, by: str
) -> None:
    """A text pruned (its model's shard, or by size) is computed again on the next call, not
    served from memory."""
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        cache.get_embeddings([TEXT])
        cache.get_embeddings([TEXT])
        report = cache.prune(**({"model": tiny_model} if by == "model" else {"max_size": 1}))
        assert report.vectors_removed == 1
        computed = len(encode_spy.texts)
        cache.get_embeddings([TEXT])
        assert len(encode_spy.texts) == computed + 1
        assert cache.stats["computed"] == 2


def test_close_empties_memory(tiny_model: str, cache_dir: Path, encode_spy: Any) -> None:
    """A cache used after close() reads its files again: a vector deleted meanwhile is
    computed, not served from the memory of before."""
    cache = EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu")
    cache.get_embeddings([TEXT])
    cache.close()
    _remove_stored_vectors(cache_dir, tiny_model)
    computed = len(encode_spy.texts)
    cache.get_embeddings([TEXT])
    assert len(encode_spy.texts) == computed + 1
    cache.close()


def test_a_shard_of_another_dimension_is_never_served_a_remembered_vector(
    cache_dir: Path,
) -> None:
    """A model's shard emptied and refilled with vectors of another length answers with the
    new ones: the memory of the old never outlives the prune."""
    from embeddingcache.storage.evict import prune

    store = Store(layout_for(cache_dir, None))
    keys = keys_of([TEXT])
    try:
        store.put("m", keys, [TEXT], np.ones((1, 32), dtype=np.float32))
        assert store.lookup("m", keys).vectors.shape == (1, 32)
        recalled = store.recall("m", keys[0])
        assert recalled is not None and recalled.vectors.shape == (1, 32)
        prune(store, model="m")
        assert store.recall("m", keys[0]) is None
        store.put("m", keys, [TEXT], np.full((1, 16), 2.0, dtype=np.float32))
        found = store.recall("m", keys[0])
        assert found is not None
        np.testing.assert_array_equal(found.vectors, np.full((1, 16), 2.0, dtype=np.float32))
    finally:
        store.close()


def test_a_remembered_vector_of_another_version_is_not_served(cache_dir: Path) -> None:
    """An entry is served only while its shard records the version it was read at."""
    store = Store(layout_for(cache_dir, None))
    keys = keys_of([TEXT])
    try:
        store.put("m", keys, [TEXT], np.ones((1, 8), dtype=np.float32))
        assert store.recall("m", keys[0]) is not None
        store.claim_revision("m", "a" * 16)  # the shard now says which version it holds
        assert store.recall("m", keys[0]) is None
        np.testing.assert_array_equal(store.lookup("m", keys).vectors, np.ones((1, 8)))
        assert store.recall("m", keys[0]) is not None  # read again, at that version
    finally:
        store.close()


def test_a_lookup_reads_the_shard_and_sees_a_row_damaged_behind_a_remembered_vector(
    cache_dir: Path,
) -> None:
    """What the shard holds (asked before a write) is the file's, damage included; the
    memory still answers a read with the vector that was stored."""
    store = Store(layout_for(cache_dir, None))
    keys = keys_of([TEXT])
    try:
        store.put("m", keys, [TEXT], np.ones((1, 4), dtype=np.float32))
        with sqlite3.connect(cache_dir / f"{model_slug('m')}.db") as connection:
            connection.execute("UPDATE embedding SET vector = x'00'")
        assert store.lookup("m", keys).damaged == [0]
        recalled = store.recall("m", keys[0])
        assert recalled is not None
        np.testing.assert_array_equal(recalled.vectors, np.ones((1, 4)))
    finally:
        store.close()


def test_a_hit_from_memory_records_a_stale_last_use_as_a_read_from_the_file_would(
    cache_dir: Path,
) -> None:
    """A hot text served from memory is not pruned as unused: its stored last use, older
    than a day, is rewritten at the next flush."""
    store = Store(layout_for(cache_dir, None))
    keys = keys_of([TEXT])
    shard = cache_dir / f"{model_slug('m')}.db"
    try:
        vector = np.ones((1, 4), dtype=np.float32)
        store.put("m", keys, [TEXT], vector)
        with sqlite3.connect(shard) as connection:
            connection.execute("UPDATE embedding SET last_used = 0")
        store.memory.put("m", [(keys[0], Remembered(vector.tobytes(), None, None, 0))])
        assert store.recall("m", keys[0]) is not None
        store.flush()
        with sqlite3.connect(shard) as connection:
            (last_used,) = connection.execute("SELECT last_used FROM embedding").fetchone()
        assert last_used > 0
        held = store.memory.get("m", keys[0])
        assert held is not None and held.last_used > 0
    finally:
        store.close()


def test_the_memory_tier_keeps_within_its_budget_dropping_the_least_recently_used() -> None:
    """Entries beyond the budget leave least recently used first; one larger than it is
    never held."""
    vector = bytes(400)
    cost = len(vector) + ENTRY_OVERHEAD
    memory = Memory(3 * cost)
    for key in (b"a", b"b", b"c"):
        memory.put("s", [(key, Remembered(vector, None, None, 0))])
    assert memory.get("s", b"a") is not None  # now the most recent
    memory.put("s", [(b"d", Remembered(vector, None, None, 0))])
    assert memory.get("s", b"b") is None
    assert all(memory.get("s", k) is not None for k in (b"a", b"c", b"d"))
    assert memory.size == 3 * cost and len(memory) == 3
    memory.put("s", [(b"e", Remembered(bytes(4 * cost), None, None, 0))])
    assert memory.get("s", b"e") is None and memory.size <= 3 * cost
    assert memory.get("other shard", b"a") is None


def test_threads_reading_and_filling_memory_always_get_their_own_keys_vector() -> None:
    """Eight threads filling and reading a small tier at once never see another key's
    vector, and the tier stays within its budget."""
    memory = Memory(50 * (8 + ENTRY_OVERHEAD))
    errors: list[str] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(3000):
            n = int(rng.integers(0, 200))
            key = n.to_bytes(8, "big")
            memory.put(f"s{n % 3}", [(key, Remembered(key, None, None, 0))])
            got = memory.get(f"s{n % 3}", key)
            if got is not None and got.vector != key:
                errors.append(f"{n}: {got.vector!r}")
            if rng.random() < 0.01:
                memory.forget(f"s{n % 3}")

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert memory.size <= memory.budget
