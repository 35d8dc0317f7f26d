"""Consistent copies of a SQLite cache's files while other processes read and write them, and
the checks of a copy: the storage half of `embeddingcache.backup` (issue 33).

A copy is SQLite's online backup API, run from a connection that holds one read transaction
for the whole copy: in WAL mode a reader never blocks a writer, and the copy is the file as
it was when that transaction began, page for page (a copy of a file that did not change is the
same bytes). Copying in steps, under that one snapshot, lets a progress bar move; without the
held transaction, a write by another process between two steps would start the copy over.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import exc as sa_exc

from ..errors import StorageError
from . import migrate
from .layout import TEXT_FILE, SQLiteLayout
from .places import Place
from .sqlite import BUSY_TIMEOUT_S, is_read_only, read_only_uri
from .store import Store

__all__ = [
    "Facts",
    "cache_files",
    "copy",
    "describe",
    "problem",
    "remove",
    "revisions",
    "seal",
    "size",
]

PAGES_PER_STEP = 256  # 4 MiB of a shard's 16 KiB pages: one move of the progress bar
SIDECARS = ("-wal", "-shm")


@dataclass(frozen=True)
class Facts:
    """What a copy of one file holds, read from the copy itself."""

    schema: str | None
    """Its schema revision (``alembic_version``)."""
    model: str | None = None
    """A shard's model (``None`` for the texts, or a shard `prune` emptied)."""
    dimension: int | None = None
    model_revision: str | None = None
    entries: int = 0
    """Vectors in a shard, texts in ``hashstring.db``."""


def cache_files(directory: Path) -> list[Path]:
    """The database files of a cache directory: every shard, then ``hashstring.db``.

    The texts come last: a text is stored before its vector, so every vector of a shard
    copied earlier has its text in the later copy of the texts.
    """
    if not directory.is_dir():
        return []
    shards = sorted(p for p in directory.glob("*.db") if p.name != TEXT_FILE and p.is_file())
    texts = directory / TEXT_FILE
    return [*shards, texts] if texts.is_file() else shards


def size(path: Path) -> int:
    """A file's bytes with its write-ahead log's: about what a copy of it takes."""
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())


def copy(source: Path, target: Path, progress: Callable[[int], None]) -> None:
    """Write a consistent copy of the SQLite file ``source`` to ``target`` (a new file), as
    of one moment, while other processes write it; ``progress`` is told the bytes copied as
    the copy goes.

    Raises:
        StorageError: the file could not be read, or the copy written.
    """
    uri = read_only_uri(source) if is_read_only(source) else source.as_uri() + "?mode=ro"
    try:
        reading = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open {source} to copy it: {exc}") from exc
    try:
        # The snapshot: from this first read on, every step copies the file as it was then.
        reading.execute("BEGIN")
        reading.execute("SELECT count(*) FROM sqlite_master").fetchone()
        page_size = int(reading.execute("PRAGMA page_size").fetchone()[0])
        copied = 0

        def step(_status: int, remaining: int, total: int) -> None:
            nonlocal copied
            progress((total - remaining - copied) * page_size)
            copied = total - remaining

        writing = sqlite3.connect(target, isolation_level=None)
        try:
            reading.backup(writing, pages=PAGES_PER_STEP, progress=step)
        finally:
            writing.close()
        reading.execute("COMMIT")
    except sqlite3.Error as exc:
        raise StorageError(f"cannot copy {source} to {target}: {exc}") from exc
    finally:
        reading.close()


def describe(directory: Path) -> dict[str, Facts]:
    """The facts of each database file in ``directory`` (copies, nobody else's), by file
    name, after bringing each to the current schema through the usual migrations.

    Raises:
        StorageError: a file could not be read or upgraded.
    """
    store = Store(SQLiteLayout(directory))
    try:
        schemas = revisions(store)
        found = {
            s.place: Facts(
                schemas.get(s.place), s.model, s.dimension, s.revision, entries=s.entries
            )
            for s in store.summaries()
        }
        if (directory / TEXT_FILE).is_file():
            found[TEXT_FILE] = Facts(schemas.get(TEXT_FILE), entries=store.text_count())
    finally:
        store.close()
    return found


def revisions(store: Store) -> dict[str, str | None]:
    """The schema revision of each file of the store's folder, by name; read-only.

    Raises:
        StorageError: a file could not be read.
    """
    layout = store.layout
    places: list[Place] = [layout.text_place(), *layout.shard_places()]
    found: dict[str, str | None] = {}
    try:
        for place in places:
            if layout.may_exist(place):
                with place.engine.connect() as connection:
                    found[place.name] = migrate.revision(connection, place)
    except sa_exc.SQLAlchemyError as exc:
        raise store.error("cannot read the schema revisions", exc) from exc
    return found


def seal(path: Path) -> None:
    """Make a copy one self-contained file (its write-ahead log emptied into it, rollback
    journal mode, which the next writer turns back to WAL), and check it.

    Raises:
        StorageError: the file could not be sealed, or SQLite finds it damaged.
    """
    try:
        with closing(sqlite3.connect(path, isolation_level=None)) as connection:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            connection.execute("PRAGMA journal_mode = DELETE")
    except sqlite3.Error as exc:
        raise StorageError(f"cannot seal the copy {path}: {exc}") from exc
    found = problem(path)
    if found is not None:
        raise StorageError(f"the copy {path} is damaged: {found}")


def problem(path: Path) -> str | None:
    """What ``PRAGMA integrity_check`` finds wrong with a SQLite file (``None``: nothing),
    read-only, without creating a file beside it."""
    try:
        uri = path.as_uri() + "?mode=ro&immutable=1"
        with closing(sqlite3.connect(uri, uri=True, isolation_level=None)) as connection:
            rows = [str(row[0]) for row in connection.execute("PRAGMA integrity_check")]
    except sqlite3.Error as exc:
        return str(exc)
    return None if rows == ["ok"] else "; ".join(rows[:5])


def remove(path: Path) -> None:
    """Remove a database file and its write-ahead log and shared memory, if there."""
    for name in (path.name, *(path.name + s for s in SIDECARS)):
        path.with_name(name).unlink(missing_ok=True)
