"""The text table's key, by hand with raw sqlite3 (issue 32): today's ``hashstring``
(``hashid BLOB PRIMARY KEY``: rows under their rowid, the 64-byte key in a unique index)
against an integer key, the digest's first 8 bytes, behind a unique index (rows appended,
the full digest kept and compared, a collision table), as the shards have had since s0006.

    python -m benchmarks.text_key [--stored 1000000] [--work /tmp/embeddingcache-textkey]

It builds, once, two ``hashstring`` files holding ``--stored`` texts each and a 384-d shard
(s0006, 16 KiB pages) holding as many vectors, in ``--work`` (kept for the next run: about
2.3 GB at 1M). Then, in alternating rounds, it stores 20,000 new texts (slices of 2,000, one
transaction each, ``INSERT OR IGNORE``, as ``Store.put`` does) into each text file, alone
and with their vectors into the shard (texts first, then vectors, a transaction each): the
whole write. WAL, ``synchronous=NORMAL``, as the library's files. Every file grows by the
rows each round adds; both layouts grow alike.
"""

from __future__ import annotations

import argparse
import hashlib
import sqlite3
import time
from pathlib import Path

import numpy as np

from .common import median, sentences

DIM = 384
NEW, SLICE = 20_000, 2000
LAYOUTS: dict[str, list[str]] = {
    "blob": ["CREATE TABLE hashstring (hashid BLOB PRIMARY KEY, text TEXT NOT NULL)"],
    "int": [
        "CREATE TABLE hashstring (id INTEGER NOT NULL, hashid BLOB NOT NULL, text TEXT NOT NULL)",
        "CREATE UNIQUE INDEX hashstring_id ON hashstring (id)",
        # A text whose id another text holds (a prefix collision: never, in practice).
        "CREATE TABLE hashstring_overflow (hashid BLOB PRIMARY KEY, text TEXT NOT NULL)",
    ],
}
SHARD = [
    "CREATE TABLE embedding (id INTEGER NOT NULL, hashid BLOB NOT NULL, vector BLOB NOT NULL, "
    "created_at INTEGER NOT NULL, last_used INTEGER NOT NULL, tokens INTEGER, "
    "tokens_exact BOOLEAN)",
    "CREATE UNIQUE INDEX embedding_id ON embedding (id)",
]


def _id(key: bytes) -> int:
    return int.from_bytes(key[:8], "big", signed=True)


def _connect(path: Path, page_size: int | None = None) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None)
    if page_size:
        connection.execute(f"PRAGMA page_size = {page_size}")
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = NORMAL")
    return connection


def _texts(start: int, n: int) -> tuple[list[str], list[bytes]]:
    texts = sentences(n, seed=start, prefix=f"t{start} ")
    return texts, [hashlib.sha512(t.encode()).digest() for t in texts]


def put_texts(
    connection: sqlite3.Connection, layout: str, keys: list[bytes], texts: list[str]
) -> None:
    """One write's text rows, as ``Store.put`` stores them, in ``layout``."""
    for start in range(0, len(keys), SLICE):
        part_keys, part_texts = keys[start : start + SLICE], texts[start : start + SLICE]
        connection.execute("BEGIN IMMEDIATE")
        if layout == "blob":
            connection.executemany(
                "INSERT OR IGNORE INTO hashstring (hashid, text) VALUES (?, ?)",
                zip(part_keys, part_texts, strict=True),
            )
        else:
            rows = [(_id(k), k, t) for k, t in zip(part_keys, part_texts, strict=True)]
            inserted = connection.executemany(
                "INSERT OR IGNORE INTO hashstring (id, hashid, text) VALUES (?, ?, ?)", rows
            ).rowcount
            if inserted < len(rows):  # an id held: the same text, or a collision
                _overflow(connection, rows)
        connection.execute("COMMIT")


def _overflow(connection: sqlite3.Connection, rows: list[tuple[int, bytes, str]]) -> None:
    marks = ",".join("?" * len(rows))
    held = dict(
        connection.execute(
            f"SELECT id, hashid FROM hashstring WHERE id IN ({marks})", [r[0] for r in rows]
        ).fetchall()
    )
    others = [(k, t) for i, k, t in rows if held.get(i) != k]
    connection.executemany(
        "INSERT OR IGNORE INTO hashstring_overflow (hashid, text) VALUES (?, ?)", others
    )


def put_vectors(connection: sqlite3.Connection, keys: list[bytes], vectors: np.ndarray) -> None:
    now = int(time.time())
    for start in range(0, len(keys), SLICE):
        part = keys[start : start + SLICE]
        rows = [
            (_id(k), k, v.tobytes(), now, now, None, None)
            for k, v in zip(part, vectors[start : start + SLICE], strict=True)
        ]
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(
            "INSERT OR IGNORE INTO embedding "
            "(id, hashid, vector, created_at, last_used, tokens, tokens_exact) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        connection.execute("COMMIT")


def build(work: Path, stored: int) -> dict[str, Path]:
    """The files holding ``stored`` texts (and vectors), built once and kept in ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    paths = {name: work / f"hashstring-{name}-{stored}.db" for name in LAYOUTS}
    paths["shard"] = work / f"shard-{stored}.db"
    done = work / f"built-{stored}"
    if done.exists():
        return paths
    for path in paths.values():
        for extra in ("", "-wal", "-shm"):
            Path(str(path) + extra).unlink(missing_ok=True)
    connections = {name: _connect(paths[name]) for name in LAYOUTS}
    connections["shard"] = _connect(paths["shard"], page_size=16384)
    for name, statements in {**LAYOUTS, "shard": SHARD}.items():
        for statement in statements:
            connections[name].execute(statement)
    step = 50_000
    started = time.perf_counter()
    for start in range(0, stored, step):
        texts, keys = _texts(10**9 + start, min(step, stored - start))
        for name in LAYOUTS:
            put_texts(connections[name], name, keys, texts)
        vectors = np.random.default_rng(start).standard_normal((len(keys), DIM), dtype=np.float32)
        put_vectors(connections["shard"], keys, vectors)
        print(f"  built {start + len(keys):,} ({time.perf_counter() - started:.0f} s)", flush=True)
    for connection in connections.values():
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        connection.close()
    done.touch()
    return paths


def measure(paths: dict[str, Path], rounds: int) -> dict[str, list[float]]:
    """Seconds per round: each layout's texts alone, and texts with vectors."""
    connections = {name: _connect(path) for name, path in paths.items()}
    times: dict[str, list[float]] = {f"{n} {w}": [] for n in LAYOUTS for w in ("texts", "whole")}
    serial = int(time.time())  # new texts in every run, against files kept between runs
    for r in range(rounds):
        for what in ("texts", "whole"):
            order = list(LAYOUTS) if r % 2 == 0 else list(reversed(LAYOUTS))
            for name in order:
                texts, keys = _texts(serial * 1000 + len(times[f"{name} {what}"]) * 10 + r, NEW)
                texts = [f"{name} {what} {t}" for t in texts]
                keys = [hashlib.sha512(t.encode()).digest() for t in texts]
                vectors = np.random.default_rng(r).standard_normal((NEW, DIM), dtype=np.float32)
                started = time.perf_counter()
                put_texts(connections[name], name, keys, texts)
                if what == "whole":
                    put_vectors(connections["shard"], keys, vectors)
                times[f"{name} {what}"].append(time.perf_counter() - started)
    for connection in connections.values():
        connection.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.text_key", description=__doc__)
    parser.add_argument("--stored", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/embeddingcache-textkey"))
    args = parser.parse_args()
    paths = build(args.work, args.stored)
    times = measure(paths, args.rounds)
    print(f"{NEW:,} new texts into {args.stored:,} stored, median of {args.rounds}:")
    for name, values in times.items():
        print(f"  {name:12} {median(values):.3f} s  ({median(values) / NEW * 1e6:.1f} us/row)")
    for what in ("texts", "whole"):
        gain = median(times[f"blob {what}"]) / median(times[f"int {what}"])
        print(f"  {what}: integer key {gain:.2f}x as fast as the 64-byte key")


if __name__ == "__main__":
    main()
