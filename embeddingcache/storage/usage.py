"""The use log of a store: hits, misses and tokens saved per model, and stale last uses.

Use is recorded the way ``relatime`` records file access: a hit rewrites a row's
``last_used`` only when the stored one is a day old or more, and those rewrites, with the
counts of hits and misses per model, wait in memory for one batched write a minute (sooner
once 10,000 rows wait; and at ``close`` or exit). A hit costs one comparison, never a write.
"""

from __future__ import annotations

import atexit
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy import exc as sa_exc

from ..errors import StorageError
from .layout import Layout
from .sqlite import write_transaction
from .tables import ShardTable

__all__ = [
    "FLUSH_INTERVAL_S",
    "FLUSH_ROWS",
    "FLUSH_WAIT_S",
    "MAX_WAITING_ROWS",
    "TOUCH_RESOLUTION_S",
    "UseLog",
    "UsedShard",
]

logger = logging.getLogger("embeddingcache.storage")

TOUCH_RESOLUTION_S = 24 * 3600  # last_used is kept to the day, like relatime
FLUSH_INTERVAL_S = 60.0
FLUSH_ROWS = 10_000  # rows waiting for a new last_used that bring the write forward
# Last use is advisory: when recording it keeps failing (a writer holding the lock for long,
# a read-only directory), what waits is capped and the rest is dropped.
MAX_WAITING_ROWS = 200_000
FLUSH_WAIT_S = 0.25  # a flush gives up on another writer's lock sooner than a store does


class UsedShard(Protocol):
    """A model shard as the log's store holds it open."""

    @property
    def table(self) -> ShardTable: ...

    @property
    def counting(self) -> bool:
        """Whether its store reads no tokens of its hits yet (another process may start
        storing them: the log then reads the model row back)."""
        ...


ShardT = TypeVar("ShardT", bound=UsedShard)

_logs: weakref.WeakSet[UseLog[Any]] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    for log in list(_logs):
        log.flush()


def _forget_after_fork() -> None:
    # A forked child inherits what its parent counted: the parent writes it, not the child.
    for log in list(_logs):
        log.forget()


os.register_at_fork(after_in_child=_forget_after_fork)


@dataclass
class _Use:
    """What waits to be recorded of one model's use."""

    hits: int = 0
    misses: int = 0
    tokens_saved: int = 0
    stale: set[bytes] | None = None  # keys hit whose stored last_used is a day old or more


class UseLog(Generic[ShardT]):
    """What waits to be recorded of a store's use, and its batched writes.

    ``open_shard(model)`` gives the store's shard of a model as it is now on disk (``None``:
    nothing stored yet); ``now_counting(model, shard, row)`` hands the store the shard's
    model row once it says that the shard counts tokens.
    """

    def __init__(
        self,
        layout: Layout,
        open_shard: Callable[[str], ShardT | None],
        now_counting: Callable[[str, ShardT, Any], None],
    ) -> None:
        self._layout = layout
        # Weak: the store owns its log, so a store nobody holds is freed at once (and its
        # log with it, unwritten), as when the store kept its use itself.
        self._open_shard = weakref.WeakMethod(open_shard)
        self._now_counting = weakref.WeakMethod(now_counting)
        self._lock = threading.Lock()
        self._use: dict[str, _Use] = {}
        self._waiting_rows = 0
        self._flush_due = time.monotonic() + FLUSH_INTERVAL_S
        self._failed_at = -FLUSH_INTERVAL_S  # when a flush last failed (monotonic)
        self._flushing = threading.Lock()
        _logs.add(self)

    def record(self, model: str, hits: int, misses: int, tokens_saved: int = 0) -> None:
        """Count a lookup's hits and misses, and the tokens its hits saved; writes what
        waits when it is due."""
        with self._lock:
            use = self._use.get(model)
            if use is None:
                use = self._use[model] = _Use()
            use.hits += hits
            use.misses += misses
            if tokens_saved:
                use.tokens_saved += tokens_saved
            now = time.monotonic()
            # Many rows waiting bring the write forward, but not sooner than an interval
            # after a write that failed: a hit never keeps waiting on another's lock.
            due = now >= self._flush_due or (
                self._waiting_rows >= FLUSH_ROWS and now >= self._failed_at + FLUSH_INTERVAL_S
            )
        if due:
            self.flush()

    def touch(self, model: str, keys: list[bytes]) -> None:
        """Note keys hit whose stored last use is stale: the next flush rewrites it."""
        with self._lock:
            use = self._use.get(model)
            if use is None:
                use = self._use[model] = _Use()
            if use.stale is None:
                use.stale = set()
            if self._waiting_rows < MAX_WAITING_ROWS:
                before = len(use.stale)
                use.stale.update(keys)
                self._waiting_rows += len(use.stale) - before

    def flush(self) -> None:
        """Write the counts and last-use times that wait, in one short transaction per
        model shard. Best effort: a shard that is locked for more than a moment, or cannot be
        written, keeps its rows waiting for the next flush (within a bound)."""
        if not self._flushing.acquire(blocking=False):
            return  # another thread is at it
        try:
            with self._lock:
                waiting, self._use = self._use, {}
                self._waiting_rows = 0
                self._flush_due = time.monotonic() + FLUSH_INTERVAL_S
            now = int(time.time())
            for model, use in waiting.items():
                try:
                    self._write(model, use, now)
                except (sa_exc.SQLAlchemyError, sqlite3.Error, StorageError, OSError) as exc:
                    logger.debug("could not record the use of %r yet: %s", model, exc)
                    self._failed_at = time.monotonic()
                    self._requeue(model, use)
        finally:
            self._flushing.release()

    def forget(self) -> None:
        """Drop what waits, unwritten (a forked child's copy of its parent's counts)."""
        self._use, self._waiting_rows = {}, 0

    def _write(self, model: str, use: _Use, now: int) -> None:
        if self._layout.read_only(self._layout.shard_place(model)):
            return  # a read-only cache records no use: it is never modified
        open_shard, now_counting = self._open_shard(), self._now_counting()
        if open_shard is None or now_counting is None:
            return  # its store is gone: nothing holds the shard any more
        shard = open_shard(model)
        if shard is None:
            # Its first vectors are on their way (a call counts before it computes): the
            # counts wait for the shard.
            self._requeue(model, use)
            return
        table = shard.table
        stale = sorted(use.stale or ())  # one order for every writer: no deadlock on Postgres
        with write_transaction(table.place.engine, wait_s=FLUSH_WAIT_S) as connection:
            if use.hits or use.misses or use.tokens_saved:
                table.add_use(connection, use.hits, use.misses, use.tokens_saved)
            table.touch(connection, stale, now, now - TOUCH_RESOLUTION_S)
            row = table.info(connection) if shard.counting else None
        if row is not None and row.counts_tokens:
            # Another process stored the shard's first counted vectors since this one
            # opened it: its hits read their tokens from now on (within a flush interval).
            now_counting(model, shard, row)

    def _requeue(self, model: str, use: _Use) -> None:
        with self._lock:
            again = self._use.setdefault(model, _Use())
            again.hits += use.hits
            again.misses += use.misses
            again.tokens_saved += use.tokens_saved
        if use.stale:
            self.touch(model, list(use.stale))
