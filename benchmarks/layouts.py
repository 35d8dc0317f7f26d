"""Three layouts of a SQLite shard's ``embedding``, by hand: what each costs a read and a write
as the shard grows (docs/benchmarks.md, "Growth"). Not part of ``python -m benchmarks``: at the
default size it builds three 1.7 GB files (in a temporary folder, removed afterwards).

    python -m benchmarks.layouts [--stored 1000000] [--dim 384]

Each file has 16 KiB pages, WAL and ``synchronous=NORMAL``, as the library's shards. Reads:
10,000 random stored keys, one ``IN`` query per 2,000, memory-mapped, median of 9. Writes:
20,000 new rows in slices of 4,096, each sorted by its key and one transaction, into an empty
shard and into the full one.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .common import median

PAGE_SIZE = 16384
MMAP_BYTES = 1 << 32
COLUMNS = "vector BLOB NOT NULL, created_at INTEGER NOT NULL, last_used INTEGER NOT NULL"
LAYOUTS: dict[str, list[str]] = {
    "hashid BLOB PRIMARY KEY (s0004)": [
        f"CREATE TABLE embedding (hashid BLOB PRIMARY KEY, {COLUMNS})",
    ],
    "id INTEGER PRIMARY KEY (s0005)": [
        f"CREATE TABLE embedding (id INTEGER PRIMARY KEY, hashid BLOB NOT NULL, {COLUMNS})",
    ],
    "appended, id behind a unique index (s0006)": [
        f"CREATE TABLE embedding (id INTEGER NOT NULL, hashid BLOB NOT NULL, {COLUMNS})",
        "CREATE UNIQUE INDEX embedding_id ON embedding (id)",
    ],
}
SAMPLE = 10_000
NEW_ROWS, SLICE = 20_000, 4096


def _key(i: int) -> bytes:
    return hashlib.sha512(b"text %d" % i).digest()


def _id(key: bytes) -> int:
    return int.from_bytes(key[:8], "big", signed=True)


class Shard:
    def __init__(self, path: Path, layout: str, dim: int) -> None:
        self.by_digest = layout.startswith("hashid")
        self.dim = dim
        self.path = path
        self.connection = sqlite3.connect(path, isolation_level=None)
        self.connection.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        self.connection.execute("PRAGMA journal_mode = WAL")
        self.connection.execute("PRAGMA synchronous = NORMAL")
        for statement in LAYOUTS[layout]:
            self.connection.execute(statement)
        names = "hashid, vector, created_at, last_used"
        if not self.by_digest:
            names = "id, " + names
        marks = ", ".join("?" * len(names.split(", ")))
        self.insert = f"INSERT OR IGNORE INTO embedding ({names}) VALUES ({marks})"

    def rows(self, numbers: range, seed: int) -> list[tuple[object, ...]]:
        vectors = np.random.default_rng(seed).standard_normal((len(numbers), self.dim))
        blobs = [v.astype(np.float32).tobytes() for v in vectors]
        keys = [_key(i) for i in numbers]
        if self.by_digest:
            return sorted((k, b, 1, 1) for k, b in zip(keys, blobs, strict=True))
        return sorted((_id(k), k, b, 1, 1) for k, b in zip(keys, blobs, strict=True))

    def fill(self, stored: int) -> None:
        for start in range(0, stored, 50_000):
            rows = self.rows(range(start, min(stored, start + 50_000)), seed=start)
            self.connection.execute("BEGIN")
            self.connection.executemany(self.insert, rows)
            self.connection.execute("COMMIT")
        self.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def reads_per_s(self, stored: int) -> float:
        reader = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
        reader.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
        keys = [_key(i) for i in random.Random(stored).sample(range(stored), SAMPLE)]
        column = "hashid" if self.by_digest else "id"
        asked = keys if self.by_digest else [_id(k) for k in keys]

        def read() -> None:
            found = 0
            for start in range(0, len(asked), 2000):
                part = asked[start : start + 2000]
                query = f"SELECT hashid, vector FROM embedding WHERE {column} IN "
                found += len(
                    reader.execute(query + f"({','.join('?' * len(part))})", part).fetchall()
                )
            assert found == len(asked)

        seconds = _timed(read)
        reader.close()
        return SAMPLE / seconds

    def write_us_per_row(self, first: int) -> float:
        rows = self.rows(range(first, first + NEW_ROWS), seed=first)
        started = time.perf_counter()
        for start in range(0, len(rows), SLICE):
            self.connection.execute("BEGIN")
            self.connection.executemany(self.insert, sorted(rows[start : start + SLICE]))
            self.connection.execute("COMMIT")
        return (time.perf_counter() - started) / len(rows) * 1e6


def _timed(work: Callable[[], None]) -> float:
    work()  # warm
    times = []
    for _ in range(9):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stored", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    args = parser.parse_args()
    print(
        f"| layout | reads at {SAMPLE:,} | reads at {args.stored:,} | ratio | writes into "
        f"{args.stored:,} | into an empty shard |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as work:
        for n, layout in enumerate(LAYOUTS):
            figures = []
            for stored in (SAMPLE, args.stored):
                shard = Shard(Path(work) / f"{n}-{stored}.db", layout, args.dim)
                shard.fill(stored)
                figures.append(shard.reads_per_s(stored))
                if stored == SAMPLE:
                    empty = Shard(Path(work) / f"{n}-empty.db", layout, args.dim)
                    fresh = empty.write_us_per_row(10**9)
                    empty.connection.close()
                else:
                    full = shard.write_us_per_row(10**9)
                shard.connection.close()
            print(
                f"| {layout} | {figures[0]:,.0f}/s | {figures[1]:,.0f}/s | "
                f"{figures[1] / figures[0]:.2f}x | {full:.1f} µs/row | {fresh:.1f} µs/row |",
                flush=True,
            )


if __name__ == "__main__":
    main()
