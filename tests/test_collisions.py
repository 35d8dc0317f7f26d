"""SQLite shards keyed by the digest's first 8 bytes: a prefix collision (forced here by an id
function that gives many keys one id) never serves a wrong vector, nor loses one."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from embeddingcache.keys import key_of
from embeddingcache.storage import Store, evict, layout_for, tables
from embeddingcache.storage.sqlite import write_transaction
from embeddingcache.transfer import export_shard, import_file

MODEL = "collide"
TEXTS = [f"text number {i}" for i in range(40)]
KEYS = [key_of(t) for t in TEXTS]
VECTORS = np.random.default_rng(3).standard_normal((len(TEXTS), 6)).astype(np.float32)


def _three_ids(keys: Sequence[bytes]) -> list[int]:
    """A broken id function: every key gets one of three ids (0, 1, 2)."""
    return [bytes(k)[0] % 3 for k in keys]


@pytest.fixture(autouse=True)
def _collide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tables, "key_ids", _three_ids)


def _store(directory: Path) -> Store:
    return Store(layout_for(directory, None))


def _served(store: Store, keys: Sequence[bytes]) -> dict[bytes, bytes]:
    found = store.lookup(MODEL, keys)
    return {keys[p]: v.tobytes() for p, v in zip(found.positions, found.vectors, strict=True)}


def _tables(path: Path) -> tuple[int, int]:
    with sqlite3.connect(path) as db:
        main = db.execute("SELECT count(*) FROM embedding").fetchone()[0]
        overflow = db.execute("SELECT count(*) FROM embedding_overflow").fetchone()[0]
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    return main, overflow


def test_keys_that_share_an_id_are_all_stored_and_each_is_served_its_own_vector(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path)
    half = len(TEXTS) // 2
    assert store.put(MODEL, KEYS[:half], TEXTS[:half], VECTORS[:half]) == 0
    # A second batch collides with the first and within itself; a stored key is kept.
    assert store.put(MODEL, KEYS[half - 2 :], TEXTS[half - 2 :], VECTORS[half - 2 :]) == 2
    served = _served(store, KEYS)
    assert served == {k: v.tobytes() for k, v in zip(KEYS, VECTORS, strict=True)}
    one = store.lookup(MODEL, [KEYS[7]])  # the one-key path, very likely from the overflow
    assert one.vectors.tobytes() == VECTORS[7].tobytes()
    store.close()
    assert _tables(tmp_path / f"{MODEL}.db") == (3, len(TEXTS) - 3)


def test_a_key_not_stored_whose_id_is_taken_is_a_miss_not_the_other_keys_vector(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path)
    store.put(MODEL, KEYS[:1], TEXTS[:1], VECTORS[:1])
    others = [k for k in KEYS[1:] if _three_ids([k]) == _three_ids(KEYS[:1])]
    assert others
    assert len(store.lookup(MODEL, others[:1]).positions) == 0
    assert len(store.lookup(MODEL, others).positions) == 0
    store.close()


def test_after_the_eviction_of_one_key_the_keys_sharing_its_id_are_still_served(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path)
    store.put(MODEL, KEYS, TEXTS, VECTORS)
    place = store.layout.shard_place(MODEL)
    with sqlite3.connect(tmp_path / f"{MODEL}.db") as db:
        in_main = [bytes(k) for (k,) in db.execute("SELECT hashid FROM embedding")]
    # Evict by age: the keys in the main table were last used long ago.
    with write_transaction(place.engine) as connection:
        connection.exec_driver_sql(
            "UPDATE embedding SET last_used = 0 WHERE hashid = ?", (in_main[0],)
        )
    report = evict.prune(store, older_than_s=3600)
    assert report.vectors_removed == 1
    served = _served(store, KEYS)
    assert in_main[0] not in served
    assert served == {k: v.tobytes() for k, v in zip(KEYS, VECTORS, strict=True) if k != in_main[0]}
    # The freed id takes the next key stored under it; the overflow ones stay served.
    again = KEYS.index(in_main[0])
    store.put(MODEL, [in_main[0]], [TEXTS[again]], VECTORS[again : again + 1])
    assert _served(store, KEYS) == {k: v.tobytes() for k, v in zip(KEYS, VECTORS, strict=True)}
    # Evict the least recently used until almost nothing is left: what stays is right.
    store.flush()
    evict.prune(store, max_size=1)
    left = _served(store, KEYS)
    assert all(left[k] == VECTORS[KEYS.index(k)].tobytes() for k in left)
    store.close()
    main, overflow = _tables(tmp_path / f"{MODEL}.db")
    assert main + overflow == len(left)


def test_keys_sharing_ids_make_the_export_import_round_trip_and_iterate_in_key_order(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path / "a")
    store.put(MODEL, KEYS, TEXTS, VECTORS)
    place = store.layout.shard_place(MODEL)
    table = tables.shard_table(place)
    with place.engine.connect() as connection:
        keys = [k for k, _ in table.after(connection, b"", 7)]
        while rows := table.after(connection, keys[-1], 7):
            keys += [k for k, _ in rows]
        assert keys == sorted(KEYS)
        assert len({k for _, _, k in table.by_use(connection)}) == len(KEYS)
        assert table.holding(connection, KEYS[::3]) == set(KEYS[::3])
        assert table.count(connection) == len(KEYS)
    path = tmp_path / "shard.jsonl"
    assert export_shard(store, MODEL, path).written == len(TEXTS)
    store.close()
    fresh = _store(tmp_path / "b")
    report = import_file(fresh, path)
    assert (report.added, report.already_present) == (len(TEXTS), 0)
    assert import_file(fresh, path).already_present == len(TEXTS)
    assert _served(fresh, KEYS) == {k: v.tobytes() for k, v in zip(KEYS, VECTORS, strict=True)}
    fresh.close()
    assert _tables(tmp_path / "b" / f"{MODEL}.db") == (3, len(TEXTS) - 3)


def test_a_damaged_vector_under_a_shared_id_is_replaced_where_it_lies(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.put(MODEL, KEYS, TEXTS, VECTORS)
    with sqlite3.connect(tmp_path / f"{MODEL}.db") as db:
        (victim,) = db.execute("SELECT hashid FROM embedding_overflow LIMIT 1").fetchone()
        db.execute("UPDATE embedding_overflow SET vector = x'00' WHERE hashid = ?", (victim,))
    i = KEYS.index(bytes(victim))
    found = store.lookup(MODEL, KEYS)
    assert found.damaged == [i]
    store.put(MODEL, [KEYS[i]], [TEXTS[i]], VECTORS[i : i + 1], replace=[KEYS[i]])
    assert _served(store, KEYS) == {k: v.tobytes() for k, v in zip(KEYS, VECTORS, strict=True)}
    store.close()
    assert sum(_tables(tmp_path / f"{MODEL}.db")) == len(KEYS)


def test_the_real_id_is_the_digests_first_eight_bytes_signed_behind_a_unique_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each row's id is its digest's prefix; the rows are appended (one write in id order,
    under rowids from 1), and a second row of an id is refused by the index."""
    monkeypatch.undo()
    store = _store(tmp_path)
    store.put(MODEL, KEYS, TEXTS, VECTORS)
    store.close()
    with sqlite3.connect(tmp_path / f"{MODEL}.db") as db:
        rows = db.execute("SELECT id, hashid, rowid FROM embedding ORDER BY rowid").fetchall()
        with pytest.raises(sqlite3.IntegrityError, match=r"embedding\.id"):
            db.execute("UPDATE embedding SET id = ? WHERE rowid = 2", (rows[0][0],))
    assert [r[1] for r in rows] == sorted(
        KEYS, key=lambda k: int.from_bytes(k[:8], "big", signed=True)
    )
    assert all(i == int.from_bytes(k[:8], "big", signed=True) for i, k, _ in rows)
    assert [r for *_, r in rows] == list(range(1, len(KEYS) + 1))
    assert _tables(tmp_path / f"{MODEL}.db") == (len(KEYS), 0)


@pytest.mark.parametrize("n", [1, 8, 9, 2000])
def test_key_ids_agree_with_int_from_bytes(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()
    keys = [key_of(str(i)) for i in range(n)]
    assert tables.key_ids(keys) == [int.from_bytes(k[:8], "big", signed=True) for k in keys]
