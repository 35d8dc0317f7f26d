"""Storage at full speed and in hard places (issue 18): writes against raw sqlite3, hits from
a read-only mount, and the Postgres read path against raw psycopg."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np

from embeddingcache import EmbeddingCache
from embeddingcache.storage.sqlite import SHARD_PAGE_SIZE

from .common import (
    DIM,
    MODEL,
    Result,
    fill,
    key_ids,
    median,
    percentile,
    random_vectors,
    sentences,
    timings,
)

N_WRITE = 20_000
N_PG = 20_000
PG_ENV = "EMBEDDING_CACHE_TEST_DB_URL"


def _keys(texts: list[str]) -> list[bytes]:
    return [hashlib.sha512(t.encode()).digest() for t in texts]


def raw_sqlite_insert(directory: Path, texts: list[str], vectors: np.ndarray) -> float:
    """Seconds for hand-written sqlite3 to store the rows in the same two tables as the
    library (the shard's ``embedding`` found by the digest's 8-byte prefix, schema s0006,
    16 KiB pages), each file in WAL mode, one transaction and one executemany INSERT OR
    IGNORE per table, the rows in the order given."""
    directory.mkdir(parents=True)
    keys = _keys(texts)
    now = int(time.time())
    started = time.perf_counter()
    texts_db = sqlite3.connect(directory / "hashstring.db", isolation_level=None)
    shard = sqlite3.connect(directory / "shard.db", isolation_level=None)
    for connection in (texts_db, shard):
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")
    texts_db.execute("CREATE TABLE hashstring (hashid BLOB PRIMARY KEY, text TEXT NOT NULL)")
    shard.execute(f"PRAGMA page_size = {SHARD_PAGE_SIZE}")
    shard.execute(
        "CREATE TABLE embedding (id INTEGER NOT NULL, hashid BLOB NOT NULL, "
        "vector BLOB NOT NULL, created_at INTEGER NOT NULL, last_used INTEGER NOT NULL, "
        "tokens INTEGER, tokens_exact BOOLEAN)"
    )
    shard.execute("CREATE UNIQUE INDEX embedding_id ON embedding (id)")
    texts_db.execute("BEGIN")
    texts_db.executemany(
        "INSERT OR IGNORE INTO hashstring VALUES (?, ?)", zip(keys, texts, strict=True)
    )
    texts_db.execute("COMMIT")
    shard.execute("BEGIN")
    ids = key_ids(keys)
    shard.executemany(
        "INSERT OR IGNORE INTO embedding VALUES (?, ?, ?, ?, ?, NULL, NULL)",
        ((i, k, v.tobytes(), now, now) for i, k, v in zip(ids, keys, vectors, strict=True)),
    )
    shard.execute("COMMIT")
    elapsed = time.perf_counter() - started
    texts_db.close()
    shard.close()
    return elapsed


def writes(work: Path, quick: bool) -> list[Result]:
    """Storing 20,000 new vectors through ``Store.put`` against raw sqlite3."""
    from embeddingcache.keys import keys_of
    from embeddingcache.storage import Store, layout_for

    repeat = 3 if quick else 5
    library, baseline, library_cpu = [], [], []
    for run in range(repeat):
        texts = sentences(N_WRITE, seed=100 + run)
        vectors = random_vectors(N_WRITE, seed=100 + run)
        keys = keys_of(texts)
        store = Store(layout_for(work / f"writes-{run}", None))
        store.put(MODEL, keys[:1], texts[:1], vectors[:1])  # the files exist: time rows only
        started, cpu = time.perf_counter(), time.process_time()
        store.put(MODEL, keys[1:], texts[1:], vectors[1:])
        library.append(time.perf_counter() - started)
        library_cpu.append(time.process_time() - cpu)
        store.close()
        baseline.append(raw_sqlite_insert(work / f"raw-writes-{run}", texts[1:], vectors[1:]))
    lib, base = median(library), median(baseline)
    n = N_WRITE - 1
    return [
        Result(
            "10. writes",
            f"storing {n:,} new {DIM}-d vectors with their texts: vectors/s",
            n / lib,
            n / base,
            "raw sqlite3 executemany INSERT OR IGNORE, one transaction per table",
            base / lib,
            ">= 0.5x",
            base / lib >= 0.5,
            unit="vectors/s",
            notes=[
                f"{lib * 1e6 / n:.1f} us per vector against raw {base * 1e6 / n:.1f} us; "
                f"library CPU {median(library_cpu):.2f} s per {n:,} rows"
            ],
        )
    ]


def read_only(work: Path, quick: bool) -> list[Result]:
    """Warm hits from a cache on a read-only bind mount against the same files writable."""
    source, mount = work / "ro-source", work / "ro-mount"
    texts = sentences(N_WRITE, seed=7)
    vectors = random_vectors(N_WRITE, seed=7)
    fill(source, texts, vectors)
    mount.mkdir()
    done = subprocess.run(
        ["mount", "--bind", "-o", "ro", str(source), str(mount)], capture_output=True
    )
    if done.returncode != 0:
        return []  # mounting needs root (or CAP_SYS_ADMIN)
    repeat = 5 if quick else 15
    try:
        measured = []
        for directory in (mount, source):
            with EmbeddingCache(MODEL, cache_dir=directory, remote_url=False) as cache:
                assert (cache.get_embeddings(texts) == vectors).all()
                measured.append(median(timings(lambda c=cache: c.get_embeddings(texts), repeat)))
        unchanged = not any(p.name.endswith(("-wal", "-shm")) for p in source.iterdir())
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    ro, rw = measured
    return [
        Result(
            "11. read-only media",
            f"{N_WRITE:,} warm hits from a read-only mount: vectors/s",
            N_WRITE / ro,
            N_WRITE / rw,
            "the same files, writable",
            rw / ro,
            ">= 0.9x, no file added",
            rw / ro >= 0.9 and unchanged,
            unit="vectors/s",
        )
    ]


def postgres(work: Path, quick: bool) -> list[Result]:
    """The Postgres read and write paths against raw psycopg on an open connection."""
    return [*postgres_reads(work, quick), *postgres_writes(work, quick)]


def postgres_writes(work: Path, quick: bool) -> list[Result]:
    """Storing 20,000 new vectors through ``Store.put`` into Postgres against raw psycopg
    inserting the same rows into the same tables of another database, on an open connection
    in one transaction: ``executemany`` of ``INSERT ... ON CONFLICT DO NOTHING`` (psycopg 3
    pipelines it), texts then vectors, which is what the library does; and ``COPY`` (binary),
    which skips no stored key and so is a bound, not the same job."""
    url = os.environ.get(PG_ENV)
    if not url:
        return []
    import psycopg
    from sqlalchemy import create_engine, make_url, text

    from embeddingcache.keys import keys_of
    from embeddingcache.storage import Store, layout_for
    from embeddingcache.storage.layout import TEXT_SCHEMA, server_schema

    names = [f"ec_bench_w{os.getpid()}_{which}" for which in ("lib", "raw")]
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        for name in names:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    lib_url, raw_url = (
        make_url(url).set(database=name).render_as_string(hide_password=False) for name in names
    )
    texts = sentences(N_PG, seed=11)
    vectors = random_vectors(N_PG, seed=11)
    keys = keys_of(texts)
    shard, hashstring = f"{server_schema(MODEL)}.embedding", f"{TEXT_SCHEMA}.hashstring"
    columns = "hashid, vector, created_at, last_used, tokens, tokens_exact"
    repeat = 3 if quick else 5
    library, inserts, copies = [], [], []
    try:
        stores = [Store(layout_for(work, u)) for u in (lib_url, raw_url)]
        for store in stores:  # the tables exist, with one row: time rows only
            store.put(MODEL, keys[:1], texts[:1], vectors[:1])
        conninfo = make_url(raw_url).set(drivername="postgresql")
        raw = psycopg.connect(conninfo.render_as_string(hide_password=False))
        n = N_PG - 1
        rest_keys, rest_texts, rest_vectors = keys[1:], texts[1:], vectors[1:]

        def truncate(connection: psycopg.Connection) -> None:  # type: ignore[type-arg]
            connection.execute(f"TRUNCATE {shard}, {hashstring}")  # the model row stays
            connection.commit()

        def raw_rows() -> list[tuple[object, ...]]:
            now = int(time.time())
            return [
                (k, v.tobytes(), now, now, None, None)
                for k, v in zip(rest_keys, rest_vectors, strict=True)
            ]

        def raw_executemany() -> None:
            with raw.cursor() as cursor:
                cursor.executemany(
                    f"INSERT INTO {hashstring} (hashid, text) VALUES (%s, %s) "
                    "ON CONFLICT DO NOTHING",
                    list(zip(rest_keys, rest_texts, strict=True)),
                )
                cursor.executemany(
                    f"INSERT INTO {shard} ({columns}) VALUES (%s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT DO NOTHING",
                    raw_rows(),
                )
            raw.commit()

        def raw_copy() -> None:
            with raw.cursor() as cursor:
                with cursor.copy(
                    f"COPY {hashstring} (hashid, text) FROM STDIN (FORMAT BINARY)"
                ) as copy:
                    copy.set_types(["bytea", "text"])
                    for row in zip(rest_keys, rest_texts, strict=True):
                        copy.write_row(row)
                with cursor.copy(f"COPY {shard} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(["bytea", "bytea", "int4", "int4", "int4", "bool"])
                    for row in raw_rows():
                        copy.write_row(row)
            raw.commit()

        lib_raw = psycopg.connect(
            make_url(lib_url).set(drivername="postgresql").render_as_string(hide_password=False)
        )
        for _ in range(repeat):
            truncate(lib_raw)
            started = time.perf_counter()
            stores[0].put(MODEL, rest_keys, rest_texts, rest_vectors)
            library.append(time.perf_counter() - started)
            for runner, measured in ((raw_executemany, inserts), (raw_copy, copies)):
                truncate(raw)
                started = time.perf_counter()
                runner()
                measured.append(time.perf_counter() - started)
        count = lib_raw.execute(f"SELECT count(*) FROM {shard}").fetchone()
        assert count is not None
        assert count[0] == n, count
        lib_raw.close()
        raw.close()
        for store in stores:
            store.close()
    finally:
        with admin.connect() as connection:
            for name in names:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    lib, many, copy = median(library), median(inserts), median(copies)
    return [
        Result(
            "14. postgres writes",
            f"storing {n:,} new {DIM}-d vectors with their texts: vectors/s",
            n / lib,
            n / many,
            "raw psycopg executemany INSERT ... ON CONFLICT DO NOTHING, one transaction",
            many / lib,
            ">= 0.5x",
            many / lib >= 0.5,
            unit="vectors/s",
            notes=[
                f"{lib * 1e6 / n:.1f} us per vector against raw {many * 1e6 / n:.1f} us; "
                f"raw binary COPY (no conflict handling): {n / copy:,.0f} vectors/s "
                f"({copy / lib:.2f}x)"
            ],
        )
    ]


def postgres_reads(work: Path, quick: bool) -> list[Result]:
    """The Postgres read path against raw psycopg on an open connection."""
    url = os.environ.get(PG_ENV)
    if not url:
        return []
    import psycopg
    from sqlalchemy import create_engine, make_url, text

    from embeddingcache.keys import keys_of
    from embeddingcache.storage import Store, layout_for
    from embeddingcache.storage.layout import server_schema

    name = f"ec_bench_{os.getpid()}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    db_url = make_url(url).set(database=name)
    try:
        texts = sentences(N_PG, seed=9)
        vectors = random_vectors(N_PG, seed=9)
        store = Store(layout_for(work, db_url.render_as_string(hide_password=False)))
        store.put(MODEL, keys_of(texts), texts, vectors)
        store.close()
        conninfo = db_url.set(drivername="postgresql").render_as_string(hide_password=False)
        raw = psycopg.connect(conninfo, autocommit=True)
        table = f"{server_schema(MODEL)}.embedding"
        keys = _keys(texts)

        def raw_lookup() -> np.ndarray:
            blobs = []
            for start in range(0, len(keys), 2000):
                rows = raw.execute(
                    f"SELECT hashid, vector FROM {table} WHERE hashid = ANY(%s)",
                    (keys[start : start + 2000],),
                ).fetchall()
                blobs += [v for _, v in rows]
            return np.frombuffer(b"".join(blobs), "<f4")

        one_key = keys[1234]

        def raw_one() -> bytes:
            row = raw.execute(
                f"SELECT vector FROM {table} WHERE hashid = %s", (one_key,), prepare=True
            ).fetchone()
            assert row is not None
            return bytes(row[0])

        repeat = 5 if quick else 15
        n = 1000 if quick else 5000
        with EmbeddingCache(
            MODEL, db_url=db_url.render_as_string(hide_password=False), remote_url=False
        ) as cache:
            assert (cache.get_embeddings(texts) == vectors).all()
            library = median(timings(lambda: cache.get_embeddings(texts), repeat))
            baseline = median(timings(raw_lookup, repeat))
            one = texts[1234]
            lib_one = timings(lambda: cache.get_embeddings([one]), n, warmup=100)
            base_one = timings(raw_one, n, warmup=100)
        raw.close()
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    p50, base50 = percentile(lib_one, 50), percentile(base_one, 50)
    return [
        Result(
            "12. postgres warm hits",
            f"{N_PG:,} distinct texts, {DIM}-d: vectors/s",
            N_PG / library,
            N_PG / baseline,
            "raw psycopg (= ANY per 2000 keys, numpy)",
            baseline / library,
            ">= 0.9x",
            baseline / library >= 0.9,
            unit="vectors/s",
        ),
        Result(
            "13. postgres one text, cached",
            "get_embeddings([text]) latency, microseconds (p50; p99 in notes)",
            p50 * 1e6,
            base50 * 1e6,
            "raw psycopg prepared single-key SELECT on an open connection",
            p50 / base50,
            "p50 <= 2x",
            p50 / base50 <= 2,
            unit="us",
            notes=[
                f"p99 {percentile(lib_one, 99) * 1e6:.0f} us against raw "
                f"{percentile(base_one, 99) * 1e6:.0f} us"
            ],
        ),
    ]
