"""SQLite engines: pragmas on connect, write transactions that take the lock up front, and
moving an unreadable file aside."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import URL, Connection, Engine, create_engine, event
from sqlalchemy import exc as sa_exc

from .._util import warn
from .tables import HitRow, SQLiteGet

__all__ = [
    "BUSY_TIMEOUT_S",
    "Reader",
    "compact",
    "is_not_a_database",
    "is_read_only",
    "move_aside",
    "read_only_uri",
    "sqlite_engine",
    "write_transaction",
]

logger = logging.getLogger("embeddingcache.storage")

# Seconds a connection waits on another's lock before SQLite reports "database is locked";
# the retry policy takes over after that.
BUSY_TIMEOUT_S = 30.0
# Larger pages hold a whole number of 384- and 768-d vectors with little slack (about 1.1x
# the payload on disk, against 1.3x with 4 KiB pages). Only a new file takes it.
SHARD_PAGE_SIZE = 16384

CHECKPOINT_WAIT_S = 2.0  # how long compaction waits for readers to let the log empty

WRITE = "embeddingcache_write"
# Readers map the shard into memory: a hit is then a memory read, not a read() call into a
# page cache of 2 MB. On a 1.7 GB shard (1M vectors) this took warm hits from 89k to about
# 130k vectors/s (benchmarks/bench_hits.py, growth). Writers keep plain I/O.
READER_MMAP_BYTES = 1 << 32


def is_read_only(path: Path) -> bool:
    """Whether this process cannot write a SQLite file or the files beside it: a read-only
    file system (``access`` says so even to root), or permission bits that forbid it. SQLite
    in WAL mode writes ``-wal`` and ``-shm`` files beside the database, even to read it,
    so a directory it cannot write is read-only too."""
    directory = path.parent
    if not directory.is_dir():
        return False  # nothing there yet: a write creates it
    if not os.access(directory, os.W_OK | os.X_OK):
        return True
    return path.exists() and not os.access(path, os.W_OK)


def read_only_uri(path: Path) -> str:
    """The URI that opens a SQLite file that cannot be written, creating nothing beside it.

    With no write-ahead log left beside it the file is all there is: ``immutable`` reads it
    without the shared-memory file (which could not be created). A log that is there holds
    committed rows, so it is read with the file, through the ``-shm`` file beside it.
    """
    wal = path.with_name(path.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        return path.as_uri() + "?mode=ro"
    return path.as_uri() + "?mode=ro&immutable=1"


def sqlite_engine(path: Path, *, page_size: int | None = None, read_only: bool = False) -> Engine:
    """An engine over one SQLite file, in WAL mode, with a busy timeout.

    Reads run in autocommit mode (each SELECT is its own snapshot and takes no lock beyond it).
    A connection with the ``embeddingcache_write`` execution option begins with
    ``BEGIN IMMEDIATE``: it takes the write lock before reading anything, so two writers queue
    on the busy timeout instead of failing to upgrade a read lock.

    ``read_only`` opens the file as `read_only_uri` says, and sets no pragma that writes: on
    a read-only medium, setting WAL mode alone fails (issue 18).
    """
    if read_only:

        def _connect() -> sqlite3.Connection:
            return sqlite3.connect(
                read_only_uri(path), uri=True, timeout=BUSY_TIMEOUT_S, check_same_thread=False
            )

        engine = create_engine("sqlite://", creator=_connect)
    else:
        url = URL.create("sqlite", database=str(path))
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we say BEGIN ourselves, see _on_begin
        cursor = dbapi_connection.cursor()
        try:
            if read_only:
                cursor.execute("PRAGMA query_only = 1")
                return
            if page_size is not None:
                cursor.execute(f"PRAGMA page_size = {int(page_size)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        if connection.get_execution_options().get(WRITE):
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


@contextmanager
def write_transaction(engine: Engine, *, wait_s: float | None = None) -> Iterator[Connection]:
    """A connection inside one write transaction, committed on success.

    ``wait_s`` bounds the wait for another writer's lock (default: the busy timeout on
    SQLite, no bound on Postgres), for writes that had better give up than wait: recording
    last use, say.
    """
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        raw = connection.connection.driver_connection if sqlite and wait_s is not None else None
        if raw is not None:
            # Set on the driver's connection: through SQLAlchemy it would begin a transaction.
            raw.execute(f"PRAGMA busy_timeout = {int(wait_s * 1000)}")  # type: ignore[operator]
        try:
            connection.execution_options(**{WRITE: True})
            with connection.begin():
                if wait_s is not None and not sqlite:
                    connection.exec_driver_sql(f"SET LOCAL lock_timeout = {int(wait_s * 1000)}")
                yield connection
        finally:
            if raw is not None:
                raw.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")


def compact(engine: Engine) -> None:
    """Give a SQLite file's free space back to the file system: ``VACUUM`` rewrites it
    (through the write-ahead log, so readers keep reading), then a checkpoint empties the log,
    which the rewrite filled with a copy of the whole file."""
    with engine.connect() as connection:
        connection.exec_driver_sql("VACUUM")
        # A reader's snapshot keeps the log from emptying. Readers of hits hold one for
        # microseconds; one held open for long (an SQL shell) is not waited for beyond a
        # moment: the data is compact already, and the log empties at a later checkpoint.
        raw = connection.connection.driver_connection
        raw.execute(f"PRAGMA busy_timeout = {int(CHECKPOINT_WAIT_S * 1000)}")  # type: ignore[union-attr]
        try:
            busy = raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()  # type: ignore[union-attr]
        finally:
            raw.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")  # type: ignore[union-attr]
    if busy is not None and busy[0]:
        logger.info(
            "%s: another connection holds a read open; the write-ahead log empties at a "
            "later checkpoint",
            engine.url.database,
        )


def is_not_a_database(exc: BaseException) -> bool:
    """Whether SQLite refused a file as not being a database at all."""
    orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    if not isinstance(orig, sqlite3.DatabaseError) or isinstance(orig, sqlite3.OperationalError):
        return False
    message = str(orig).lower()
    return "file is not a database" in message or "malformed" in message


def move_aside(path: Path) -> Path:
    """Rename a damaged database (and its WAL files) out of the way; never delete it."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    path.rename(target)
    for suffix in ("-wal", "-shm"):
        sidecar = path.with_name(path.name + suffix)
        if sidecar.exists():
            sidecar.rename(target.with_name(target.name + suffix))
    message = f"cache file {path} is not a readable SQLite database; moved it to {target}"
    logger.warning(message)
    warn(message)
    return target


class _Connection:
    """One thread's connection, and the lock that keeps ``close`` from pulling it away in
    the middle of a query (closing a sqlite3 connection another thread is reading from
    crashes the process)."""

    __slots__ = ("closed", "connection", "lock")

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection
        self.lock = threading.Lock()
        self.closed = False

    def execute(self, sql: str, parameters: Sequence[Any]) -> list[Any]:
        return self.connection.execute(sql, parameters).fetchall()


class Reader:
    """Plain ``sqlite3`` connections that only read one file, one per thread, memory-mapped.

    The hit path is a few microseconds of SQLite per key; SQLAlchemy's per-statement work
    (compiling the expanding IN, events, result rows) cost more than that, so hits skip it.
    ``PRAGMA query_only`` makes sure these connections never write; in WAL mode they never
    wait for a writer either.
    """

    def __init__(self, path: Path, table: str, *, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only  # see read_only_uri
        self._get = SQLiteGet(table)  # by id, every key compared, then the overflow
        self._local = threading.local()
        self._opened: list[_Connection] = []
        self._generation = 0
        self._lock = threading.Lock()

    def rows(self, keys: Sequence[bytes], chunk: int, *, tokens: bool = False) -> list[HitRow]:
        """``(hashid, vector, last_used, tokens)`` of the stored ``keys``, one query per ``chunk``
        keys; ``tokens`` is ``None`` unless asked for (see ``tables.sqlite_get_sql``).

        Raises:
            sqlite3.Error: the file could not be read.
        """
        while True:
            entry = self._connection()
            with entry.lock:
                if entry.closed:  # closed between the two lines above: open anew
                    continue
                execute = entry.execute
                rows: list[HitRow] = self._get.rows(execute, keys, chunk, tokens=tokens)
                return rows

    def _connection(self) -> _Connection:
        local = self._local
        entry: _Connection | None = getattr(local, "entry", None)
        if entry is None or entry.closed or local.generation != self._generation:
            # mode=rw: a shard removed meanwhile is an error here, never a new empty file.
            uri = read_only_uri(self.path) if self.read_only else self.path.as_uri() + "?mode=rw"
            opened = sqlite3.connect(
                uri,
                uri=True,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
            opened.execute("PRAGMA query_only = 1")
            opened.execute(f"PRAGMA mmap_size = {READER_MMAP_BYTES}")
            entry = _Connection(opened)
            with self._lock:
                self._opened.append(entry)
                local.entry, local.generation = entry, self._generation
        return entry

    def close(self) -> None:
        """Close every thread's connection, each once its current query ends; the next
        read opens a new one (after a file was moved aside, say)."""
        with self._lock:
            opened, self._opened = self._opened, []
            self._generation += 1
        for entry in opened:
            with entry.lock:
                entry.closed = True
                entry.connection.close()
