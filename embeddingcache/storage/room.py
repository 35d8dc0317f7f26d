"""Making room on a full disk, so that a prune can run there (issue 30).

On a disk with no room at all SQLite frees none by itself, as measured on a full 8 MiB
tmpfs: deleting a row appends its pages to the write-ahead log; a checkpoint must grow the
database file to take the log's pages (a cache that filled the disk holds its latest rows in
its logs, none of them copied yet: ``wal_checkpoint`` fails with "database or disk is full");
``VACUUM`` rewrites the whole file through the log; and a process that opens a file first
cannot even read it, as its ``-shm`` file cannot grow. What frees room without writing is
truncating a file or removing one. So a prune that meets a full disk:

1. checkpoints each file and truncates its log: room comes back where the database already
   holds the log's pages (`truncate_logs`);
2. tries again, and while the disk is still full,
3. removes the least recently written shard it may remove, whole: its file, then its log and
   shared-memory file (`remove_shard`), and tries again.

A file that another process holds open keeps its room until that process lets it go (its
next write opens the file anew: see ``Layout.replaced``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import exc as sa_exc

from .places import Place, ShardPlace
from .sqlite import CHECKPOINT_WAIT_S, read_only_uri
from .store import Store
from .tables import shard_table

__all__ = ["allocated_bytes", "least_recently_written", "remove_shard", "truncate_logs"]

logger = logging.getLogger("embeddingcache.storage")

SIDECARS = ("-wal", "-shm")


def allocated_bytes(store: Store) -> int:
    """The bytes the disk gives the cache's files and logs, read from the file system alone
    (a process cannot read a file before it has room for its ``-shm`` file). Not their sizes:
    a checkpoint that failed for want of room leaves a file extended past what it holds."""
    places: list[Place] = [store.layout.text_place(), *store.layout.shard_places()]
    files = [f for p in places if p.path is not None for f in (p.path, _sidecar(p.path, "-wal"))]
    # st_blocks counts 512-byte units (POSIX); where there is none, the size is all there is.
    return sum(_allocated(f.stat()) for f in files if f.exists())


def _allocated(found: os.stat_result) -> int:
    blocks = getattr(found, "st_blocks", None)
    return found.st_size if blocks is None else blocks * 512


def truncate_logs(store: Store) -> None:
    """Checkpoint every file of a SQLite cache and truncate its write-ahead log, where that
    needs no room: a failure (the database file would have to grow) leaves the file as it
    was."""
    places: list[Place] = [store.layout.text_place(), *store.layout.shard_places()]
    for place in places:
        path = place.path
        if path is None or not _sidecar(path, "-wal").exists():
            continue
        try:
            with place.engine.connect() as connection:
                raw = connection.connection.driver_connection
                raw.execute(f"PRAGMA busy_timeout = {int(CHECKPOINT_WAIT_S * 1000)}")  # type: ignore[union-attr]
                raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # type: ignore[union-attr]
        except (sa_exc.SQLAlchemyError, sqlite3.Error) as exc:
            logger.info("%s: cannot empty the write-ahead log here (%s)", place.name, exc)


def least_recently_written(places: Sequence[ShardPlace]) -> list[ShardPlace]:
    """``places`` that exist, the one whose file or log was written longest ago first: every
    write of a shard (a stored vector, a batch of recorded hits) touches its log."""

    def written(place: ShardPlace) -> float:
        assert place.path is not None
        files = [place.path, _sidecar(place.path, "-wal")]
        return max(f.stat().st_mtime for f in files if f.exists())

    return sorted((p for p in places if p.path is not None and p.path.exists()), key=written)


def remove_shard(store: Store, place: ShardPlace) -> tuple[str, int]:
    """Remove a shard's file, log and shared-memory file; its model (the file's name when it
    cannot be read) and the vectors it held.

    The log goes first: a log left beside a new file of the same name would be replayed
    into it. A crash before the file goes leaves a file without its log, which the next
    open may find damaged and move aside (see `sqlite.move_aside`)."""
    assert place.path is not None
    model, entries = _described(place)
    if model != place.name:  # a model's name, read from the file: forget what was known
        store.forget(model)
    store.layout.reader(place).close()  # type: ignore[union-attr]  # a file has a reader
    place.engine.dispose()  # this process's connections let the file's room go
    _sidecar(place.path, "-wal").unlink(missing_ok=True)
    place.path.unlink(missing_ok=True)
    _sidecar(place.path, "-shm").unlink(missing_ok=True)
    logger.warning(
        "no room left on the disk: removed the shard %s whole (%d vectors of %r)",
        place.name,
        entries,
        model,
    )
    return model, entries


def _described(place: ShardPlace) -> tuple[str, int]:
    """A shard's model and count of vectors, read through the engine, or else as the file
    alone has them (no ``-shm`` file is needed: see `sqlite.read_only_uri`)."""
    table = shard_table(place)
    with contextlib.suppress(sa_exc.SQLAlchemyError), place.engine.connect() as connection:
        row = table.info(connection)
        return (row.model if row else place.name), table.count(connection)
    assert place.path is not None
    with contextlib.suppress(sqlite3.Error):
        db = sqlite3.connect(read_only_uri(place.path), uri=True)
        try:
            row = db.execute("SELECT model FROM model_info").fetchone()
            count = db.execute("SELECT count(*) FROM embedding").fetchone()[0]
            return (row[0] if row else place.name), int(count)
        finally:
            db.close()
    return place.name, 0


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)
