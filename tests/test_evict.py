"""Eviction: last use recorded in batches, prune by age, size and model, max_size, and the
texts no shard refers to any longer."""

from __future__ import annotations

import sqlite3
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select, update

from embeddingcache import EmbeddingCache, InvalidInputError
from embeddingcache.cli import main
from embeddingcache.keys import key_of
from embeddingcache.storage import store as store_module
from embeddingcache.storage import usage
from embeddingcache.storage.sqlite import write_transaction

DAY = 86400


def set_last_used(cache: EmbeddingCache, texts: list[str], when: int) -> None:
    """Move the last use of ``texts`` (in the cache's model) to ``when``, on any backend."""
    place = cache._store.layout.shard_place(cache.model)
    table = place.embedding
    with write_transaction(place.engine) as connection:
        connection.execute(
            update(table)
            .where(table.c.hashid.in_([key_of(t) for t in texts]))
            .values(last_used=when, created_at=min(when, int(time.time())))
        )


def last_used(cache: EmbeddingCache, texts: list[str]) -> dict[str, int]:
    place = cache._store.layout.shard_place(cache.model)
    table = place.embedding
    with place.engine.connect() as connection:
        rows = connection.execute(
            select(table.c.hashid, table.c.last_used).where(
                table.c.hashid.in_([key_of(t) for t in texts])
            )
        ).all()
    by_key = dict(rows)
    return {t: by_key[key_of(t)] for t in texts if key_of(t) in by_key}


def on_disk(cache_dir: Path) -> int:
    """The bytes of the cache's database files and write-ahead logs (not the -shm index)."""
    return sum(f.stat().st_size for f in cache_dir.glob("*.db*") if not f.name.endswith("-shm"))


def stored_texts(cache: EmbeddingCache) -> set[str]:
    place = cache._store.layout.text_place()
    with place.engine.connect() as connection:
        return set(connection.scalars(select(place.hashstring.c.text)))


# -- last use -------------------------------------------------------------------------------


def test_a_hit_on_a_day_old_entry_is_recorded_at_the_next_flush_not_at_the_hit(
    cache: EmbeddingCache,
) -> None:
    """Last use is rewritten only for entries a day old, and only when the batch is written."""
    texts = ["old one", "old two", "fresh"]
    cache.get_embeddings(texts)
    long_ago = int(time.time()) - 10 * DAY
    set_last_used(cache, texts[:2], long_ago)
    fresh_before = last_used(cache, ["fresh"])["fresh"]
    cache.get_embeddings(texts)
    assert last_used(cache, texts[:2]) == {"old one": long_ago, "old two": long_ago}
    cache._store.flush()
    after = last_used(cache, texts)
    assert all(after[t] >= int(time.time()) - 5 for t in texts[:2])
    assert after["fresh"] == fresh_before  # within the day: no write at all


def test_use_is_written_once_the_interval_has_passed_without_closing(
    tiny_model: str, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long-lived process records its use about once a minute, not only at exit."""
    monkeypatch.setattr(usage, "FLUSH_INTERVAL_S", 0.0)
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        cache.get_embeddings(["a", "b"])
        cache.get_embeddings(["a", "b", "c"])
        with sqlite3.connect(next(cache_dir.glob("tmp*.db"))) as db:
            assert db.execute("SELECT hits, misses FROM model_info").fetchone() == (2, 3)


def test_a_locked_shard_keeps_the_use_waiting_until_it_can_be_written(
    cache: EmbeddingCache, cache_dir: Path
) -> None:
    """Recording use never waits on a busy writer for long, and loses nothing by giving up."""
    cache.get_embeddings(["x", "y"])
    set_last_used(cache, ["x"], int(time.time()) - 3 * DAY)
    cache._store.flush()
    cache.get_embeddings(["x", "y"])
    shard = next(cache_dir.glob("tmp*.db"))
    blocker = sqlite3.connect(shard, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        cache._store.flush()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert last_used(cache, ["x"])["x"] < int(time.time()) - 2 * DAY
    cache._store.flush()
    assert last_used(cache, ["x"])["x"] >= int(time.time()) - 5
    with sqlite3.connect(shard) as db:
        assert db.execute("SELECT hits, misses FROM model_info").fetchone() == (2, 2)


# -- prune ----------------------------------------------------------------------------------


def test_prune_by_age_removes_exactly_the_entries_unused_for_that_long(
    any_cache: EmbeddingCache,
) -> None:
    """--older-than takes the entries and their texts, keeps the rest bit for bit."""
    old, recent = [f"old {i}" for i in range(5)], [f"recent {i}" for i in range(5)]
    before = any_cache.get_embeddings(old + recent)
    set_last_used(any_cache, old, int(time.time()) - 40 * DAY)
    set_last_used(any_cache, recent[:2], int(time.time()) - 20 * DAY)
    report = any_cache.prune(older_than=timedelta(days=30))
    assert report.removed == {any_cache.model: 5}
    assert report.texts_removed == 5
    assert stored_texts(any_cache) == set(recent)
    assert set(last_used(any_cache, old + recent)) == set(recent)
    hits = any_cache.stats["hits"]
    np.testing.assert_array_equal(any_cache.get_embeddings(recent), before[5:])
    assert any_cache.stats["hits"] == hits + 5


def test_a_dry_run_reports_what_the_real_run_then_removes(cache: EmbeddingCache) -> None:
    """--dry-run changes nothing and names the same entries as the run that follows."""
    cache.get_embeddings([f"t{i}" for i in range(20)])
    set_last_used(cache, [f"t{i}" for i in range(8)], int(time.time()) - 9 * DAY)
    dry = cache.prune(older_than=7 * DAY, dry_run=True)
    assert dry.dry_run and dry.removed == {cache.model: 8}
    assert len(stored_texts(cache)) == 20
    real = cache.prune(older_than=7 * DAY)
    assert real.removed == dry.removed and not real.dry_run
    assert len(stored_texts(cache)) == 12


def test_prune_to_a_size_removes_the_least_recently_used_first(
    cache: EmbeddingCache, cache_dir: Path
) -> None:
    """--max-size: the files end within the budget, and every entry kept was used more
    recently than every entry removed."""
    texts = [f"entry number {i} with some words" for i in range(3000)]
    cache.get_embeddings(texts)
    now = int(time.time())
    for i in range(0, 3000, 100):  # 30 generations of use, 100 entries each
        set_last_used(cache, texts[i : i + 100], now - (30 - i // 100) * DAY)
    cache._store.flush()
    for path in cache_dir.glob("*.db"):  # a budget of a third of the rows, not of the logs
        with sqlite3.connect(path) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = cache._store.total_bytes()
    budget = size // 3
    report = cache.prune(max_size=budget)
    assert report.bytes_before == size
    assert report.texts_removed == report.vectors_removed
    assert budget * 0.8 < report.bytes_after <= budget
    assert report.bytes_after == on_disk(cache_dir)
    kept = last_used(cache, texts)
    removed = [t for t in texts if t not in kept]
    assert removed and kept
    assert max(last_used_before(texts, now, t) for t in removed) <= min(
        last_used_before(texts, now, t) for t in kept
    )
    assert stored_texts(cache) == set(kept)
    with sqlite3.connect(next(cache_dir.glob("tmp*.db"))) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_a_size_budget_the_rows_fit_and_the_write_ahead_logs_do_not_empties_the_logs(
    cache: EmbeddingCache, cache_dir: Path
) -> None:
    """--max-size between the pages in use and the bytes on disk: nothing is removed, and the
    files end within the budget (the logs emptied into them)."""
    texts = [f"entry number {i} with some words" for i in range(3000)]
    cache.get_embeddings(texts)
    for i in range(0, 3000, 100):  # each update dirties pages all over the shard
        set_last_used(cache, texts[i : i + 100], int(time.time()) - DAY)
    cache._store.flush()
    live, size = cache._store.live_bytes(), cache._store.total_bytes()
    assert size - live > 4 * 16384  # the logs hold more than a few pages
    budget = (live + size) // 2
    report = cache.prune(max_size=budget)
    assert report.removed == {} and report.bytes_after <= budget
    assert on_disk(cache_dir) <= budget
    assert len(stored_texts(cache)) == 3000


def last_used_before(texts: list[str], now: int, text: str) -> int:
    """The last use the size test gave ``text``."""
    return now - (30 - texts.index(text) // 100) * DAY


def test_prune_by_model_empties_that_shard_only_and_keeps_shared_texts(
    tiny_model: str, prompted_model: str, cache_dir: Path
) -> None:
    """--model removes one model's vectors and its own texts; the name can be used afresh."""
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        plain = cache.get_embeddings(["shared", "only plain"])
        cache.get_embeddings(["shared", "only prompted"], prompted_model, prompt_name="query")
        cache.get_embeddings(["shared"], prompted_model, prompt_name=None)
        report = cache.prune(model=prompted_model)
        assert report.removed == {prompted_model: 3}
        assert stored_texts(cache) == {"shared", "only plain"}
        np.testing.assert_array_equal(cache.get_embeddings(["shared", "only plain"]), plain)
        assert {s.model: s.entries for s in cache.contents().shards} == {
            tiny_model: 2,
            None: 0,
        }
        cache.get_embeddings(["again"], prompted_model)
        assert {s.model: s.entries for s in cache.contents().shards} == {
            tiny_model: 2,
            prompted_model: 1,
        }


def test_prune_removes_texts_left_without_any_vector(cache: EmbeddingCache) -> None:
    """A text whose vector never arrived (a crash between the two writes) goes at a prune."""
    cache.get_embeddings(["kept"])
    place = cache._store.layout.text_place()
    with write_transaction(place.engine) as connection:
        connection.execute(
            place.hashstring.insert(), {"hashid": key_of("orphan"), "text": "orphan"}
        )
    report = cache.prune(older_than=365 * DAY)
    assert report.vectors_removed == 0 and report.texts_removed == 1
    assert stored_texts(cache) == {"kept"}


def test_prune_refuses_what_it_cannot_do(tiny_model: str, cache: EmbeddingCache) -> None:
    """No criterion, an unknown model and a negative age are clear errors that remove nothing."""
    cache.get_embeddings(["stay"])
    with pytest.raises(InvalidInputError, match="say what to prune"):
        cache.prune()
    with pytest.raises(InvalidInputError, match="nothing is stored for model 'other'"):
        cache.prune(model="other")
    with pytest.raises(InvalidInputError, match="older_than"):
        cache.prune(older_than=-1)
    assert stored_texts(cache) == {"stay"}


def test_a_size_budget_is_refused_on_postgres(tiny_model: str, pg_url: str) -> None:
    """Postgres keeps freed space, so a byte budget there would remove everything."""
    with pytest.raises(InvalidInputError, match="max_size needs a SQLite cache directory"):
        EmbeddingCache(tiny_model, db_url=pg_url, max_size=10**9)
    with EmbeddingCache(tiny_model, db_url=pg_url, device="cpu") as cache:
        cache.get_embeddings(["x"])
        with pytest.raises(InvalidInputError, match="size budget needs a SQLite"):
            cache.prune(max_size=10**6)
        assert cache.prune(model=tiny_model).removed == {tiny_model: 1}
        assert stored_texts(cache) == set()


# -- max_size -------------------------------------------------------------------------------


def test_max_size_keeps_the_cache_within_budget_and_keeps_what_is_in_use(
    tiny_model: str, cache_dir: Path
) -> None:
    """A cache with max_size prunes itself as it grows; the entries in use stay."""
    budget = 400_000
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu", max_size=budget) as cache:
        favourites = [f"favourite {i}" for i in range(50)]
        wanted = cache.get_embeddings(favourites)
        # The favourites were used on a later day than any text that passes by.
        set_last_used(cache, favourites, int(time.time()) + DAY)
        for start in range(0, 6000, 500):
            cache.get_embeddings([f"passing text {i}" for i in range(start, start + 500)])
            assert cache._store.live_bytes() <= budget
        hits = cache.stats["hits"]
        np.testing.assert_array_equal(cache.get_embeddings(favourites), wanted)
        assert cache.stats["hits"] == hits + 50
        assert 0 < cache.contents().shards[0].entries < 6050


# -- the command line -----------------------------------------------------------------------


def test_the_prune_and_stats_commands_say_what_they_did(
    cache: EmbeddingCache, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """prune prints what it removed (or would), stats the hits and misses of past runs."""
    cache.get_embeddings(["a", "b", "c"])
    cache.get_embeddings(["a", "b"])
    set_last_used(cache, ["a"], int(time.time()) - 100 * DAY)
    cache.close()
    where = ["--cache-dir", str(cache_dir)]
    assert main(["stats", *where]) == 0
    out = capsys.readouterr().out
    assert "3 vectors, 32-d" in out and "2 hits, 3 misses (40% hits)" in out
    assert main(["prune", "--older-than", "90d", "--dry-run", *where]) == 0
    assert "would remove 1 vectors" in capsys.readouterr().out
    assert main(["prune", "--older-than", "90d", *where]) == 0
    out = capsys.readouterr().out
    assert "removed 1 vectors" in out and "and 1 texts" in out
    assert main(["prune", "--max-size", "1GB", *where]) == 0
    assert "nothing to remove" in capsys.readouterr().out


def test_stats_shows_the_counts_of_past_runs(
    tiny_model: str, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Hits and misses add up across processes' runs and show per model."""
    for _ in range(2):
        with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
            cache.get_embeddings(["a", "b", "c"])
    assert main(["stats", "--cache-dir", str(cache_dir)]) == 0
    assert "3 hits, 3 misses (50% hits)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["prune"], "say what to prune"),
        (["prune", "--max-size", "lots"], "is not a size"),
        (["prune", "--older-than", "30"], "is not an age"),
        (["prune", "--older-than", "6M"], "is not an age"),
        (["prune", "--older-than", "99999999999999999999d"], "is not an age"),
        (["prune", "--model", "nobody"], "nothing is stored for model 'nobody'"),
    ],
)
def test_prune_mistakes_are_one_line(
    cache: EmbeddingCache,
    cache_dir: Path,
    arguments: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each mistake is a non-zero exit and a line naming it, without a traceback."""
    cache.get_embeddings(["x"])
    try:
        code = main([*arguments, "--cache-dir", str(cache_dir)])
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code != 0
    assert message in err and "Traceback" not in err


def test_readers_keep_getting_right_vectors_while_a_prune_compacts_the_files(
    tiny_model: str, cache_dir: Path
) -> None:
    """Pruning and VACUUM under threads that read: every read returns the stored vectors."""
    import threading

    kept = [f"kept {i}" for i in range(200)]
    with EmbeddingCache(tiny_model, cache_dir=cache_dir, device="cpu") as cache:
        expected = cache.get_embeddings(kept)
        cache.get_embeddings([f"old {i}" for i in range(3000)])
        set_last_used(cache, [f"old {i}" for i in range(3000)], int(time.time()) - 50 * DAY)
        stop = threading.Event()
        failures: list[BaseException] = []

        def read() -> None:
            try:
                while not stop.is_set():
                    np.testing.assert_array_equal(cache.get_embeddings(kept), expected)
            except BaseException as exc:  # reported below
                failures.append(exc)

        readers = [threading.Thread(target=read) for _ in range(3)]
        for reader in readers:
            reader.start()
        try:
            report = cache.prune(older_than=30 * DAY)
        finally:
            stop.set()
            for reader in readers:
                reader.join()
        assert not failures, failures
        assert report.vectors_removed == 3000
        assert report.bytes_after < report.bytes_before / 2
        np.testing.assert_array_equal(cache.get_embeddings(kept), expected)


def test_a_size_budget_removes_texts_without_vectors_before_any_vector(
    cache: EmbeddingCache,
) -> None:
    """Texts no model uses (a shard deleted by hand, say) are the first to go."""
    cache.get_embeddings([f"kept {i}" for i in range(100)])
    place = cache._store.layout.text_place()
    with write_transaction(place.engine) as connection:
        connection.execute(
            place.hashstring.insert(),
            [
                {"hashid": key_of(f"orphan {i}" * 50), "text": f"orphan {i}" * 50}
                for i in range(2000)
            ],
        )
    budget = cache._store.live_bytes() // 3
    report = cache.prune(max_size=budget)
    assert report.vectors_removed == 0 and report.texts_removed == 2000
    assert cache._store.live_bytes() <= budget
    assert len(stored_texts(cache)) == 100


def test_a_size_budget_is_met_while_another_connection_holds_a_read_open(
    cache: EmbeddingCache, cache_dir: Path
) -> None:
    """A reader's snapshot keeps the write-ahead log from emptying; the budget counts the
    data, so prune removes what the budget asks, not nearly everything."""
    texts = [f"entry {i}" for i in range(3000)]
    cache.get_embeddings(texts)
    cache._store.flush()
    reader = sqlite3.connect(next(cache_dir.glob("tmp*.db")), isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM embedding").fetchone()
    try:
        budget = cache._store.live_bytes() // 2
        report = cache.prune(max_size=budget)
    finally:
        reader.execute("ROLLBACK")
        reader.close()
    assert cache._store.live_bytes() <= budget
    assert report.vectors_removed < 2000  # about a third goes with the pages' own slack


def test_a_text_removed_between_its_two_writes_is_put_back(
    any_cache: EmbeddingCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prune that runs between a writer's text and vector transactions cannot leave a
    vector without its text."""
    from embeddingcache.storage.store import Store

    cache = any_cache
    write_vectors = Store._put_vectors

    def prune_first(self: Store, *args: object, **kwargs: object) -> None:
        cache.prune(older_than=365 * DAY)  # the texts have no vector yet: they go
        write_vectors(self, *args, **kwargs)  # type: ignore[arg-type]

    cache.get_embeddings(["first"])
    monkeypatch.setattr(Store, "_put_vectors", prune_first)  # the fault: a prune in between
    cache.get_embeddings(["raced one", "raced two"])
    monkeypatch.undo()
    assert stored_texts(cache) == {"first", "raced one", "raced two"}


def test_a_writer_stores_its_texts_once_when_no_prune_ran_between_its_writes(
    any_cache: EmbeddingCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second insert of a write's texts happens only after a prune removed texts (the
    backend counts removals: SQLite's file header, a Postgres sequence)."""
    from embeddingcache.storage.tables import text_table

    cache = any_cache
    cache.get_embeddings(["first"])
    table_class = type(text_table(cache._store.layout.text_place()))
    put_new = table_class.put_new
    inserted: list[int] = []

    def counted(self: object, connection: object, rows: list[object]) -> int:
        inserted.append(len(rows))
        return put_new(self, connection, rows)  # type: ignore[arg-type]

    monkeypatch.setattr(table_class, "put_new", counted)
    cache.get_embeddings(["one", "two"])
    assert inserted == [2]
    set_last_used(cache, ["first", "one", "two"], int(time.time()) - 3 * DAY)
    cache.prune(older_than=DAY)  # removes them and their texts: the count moves
    inserted.clear()
    cache.get_embeddings(["three"])
    assert inserted == [1]
    assert stored_texts(cache) == {"three"}


def test_a_failed_flush_is_not_retried_on_every_hit(
    cache: EmbeddingCache, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With many rows waiting and another writer holding the lock, hits do not each wait
    for it: the next try comes an interval later."""
    monkeypatch.setattr(usage, "FLUSH_ROWS", 1)
    texts = [f"t{i}" for i in range(20)]
    cache.get_embeddings(texts)
    set_last_used(cache, texts, int(time.time()) - 3 * DAY)
    attempts = []
    write_use = usage.UseLog._write

    def counted(self: usage.UseLog[Any], *args: object) -> None:
        attempts.append(1)
        write_use(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(usage.UseLog, "_write", counted)
    blocker = sqlite3.connect(next(cache_dir.glob("tmp*.db")), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        for text in texts:
            cache.get_embeddings([text])
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert len(attempts) == 1


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_prune_by_model_beside_a_writer_leaves_no_vector_without_its_model_row(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that found the model row and is inserting its vectors when `prune --model`
    empties the shard: either the prune removes them too, or they stay with a model row;
    never vectors that no model row vouches for (the next writer could claim the shard for
    another model or dimension, and old vectors would be served as its)."""
    import threading

    from sqlalchemy import create_engine, text

    from embeddingcache.storage import Store, layout_for
    from embeddingcache.storage.evict import prune
    from embeddingcache.storage.tables import shard_table

    model = "race/model"
    db_url = request.getfixturevalue("pg_url") if backend == "postgres" else None

    def a_store() -> Store:
        return Store(layout_for(tmp_path / "cache", db_url))

    writer, pruner = a_store(), a_store()
    writer.put(model, [key_of("old")], ["old"], np.ones((1, 4), np.float32))
    if db_url is not None:
        watcher = create_engine(db_url)

        def prune_waits() -> bool:  # for a lock the writer holds
            with watcher.connect() as connection:
                query = (
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
                return bool(connection.execute(text(query)).scalar())
    else:

        def prune_waits() -> bool:  # in SQLite's busy handler: no telling, give it a second
            pruned.wait(1.0)
            return True

    claimed, pruned = threading.Event(), threading.Event()
    ensure_info = store_module._ensure_info

    def paused(*args: object, **kwargs: object) -> object:
        # The fault: the writer stops after reading the model row, inside its transaction,
        # until the prune has run or waits for it.
        info = ensure_info(*args, **kwargs)  # type: ignore[arg-type]
        if threading.current_thread().name == "writer":
            claimed.set()
            deadline = time.monotonic() + 30
            while not (pruned.is_set() or prune_waits()) and time.monotonic() < deadline:
                time.sleep(0.02)
        return info

    monkeypatch.setattr(store_module, "_ensure_info", paused)
    write = threading.Thread(
        target=writer.put,
        args=(model, [key_of("new")], ["new"], np.full((1, 4), 2.0, np.float32)),
        name="writer",
    )
    write.start()
    assert claimed.wait(30)

    def prune_model() -> None:
        prune(pruner, model=model)
        pruned.set()

    pruning = threading.Thread(target=prune_model)
    pruning.start()
    pruning.join(60)
    write.join(60)
    assert not pruning.is_alive() and not write.is_alive()
    monkeypatch.undo()
    after = a_store()
    place = after.layout.shard_place(model)
    with place.engine.connect() as connection:
        table = shard_table(place)
        info, entries = table.info(connection), table.count(connection)
    assert info is not None or entries == 0, f"{entries} vector(s) without a model row"
    if info is not None:  # the writer's vector stayed, and only it
        assert after.lookup(model, [key_of("old"), key_of("new")]).vectors.tolist() == [[2.0] * 4]
    for store in (writer, pruner, after):
        store.close()
    if db_url is not None:
        watcher.dispose()
