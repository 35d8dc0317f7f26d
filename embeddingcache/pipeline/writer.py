"""The writer: one thread that stores what a call computed or fetched while the call goes on,
and the one rule for storing fresh vectors (`Writer.store_rows`, `store_new`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

import numpy as np

from .._util import first_non_finite
from ..errors import InvalidInputError, StorageError
from ..keys import keys_of
from ..storage import Store
from .call import Rows, dedupe
from .counters import Counters
from .policy import StoragePolicy, degraded

__all__ = ["REMOTE_WRITES_AHEAD", "Writer", "store_new"]

logger = logging.getLogger("embeddingcache")

# Writes of the backend's vectors a call hands over without waiting, at most: beyond that a
# call waits for the oldest, so that a long job of remote hits (iter_embeddings) holds a few
# chunks in memory, not every chunk the local disk has not caught up with.
REMOTE_WRITES_AHEAD = 2

T = TypeVar("T")


class Writer:
    """Stores rows in the order they are handed over, on one thread, so that a slice handed
    over after the backend's vectors is stored after them (thread-safe)."""

    def __init__(self, storage: Store, policy: StoragePolicy, counters: Counters) -> None:
        self.storage = storage
        self.policy = policy
        self.counters = counters
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._unawaited: list[Future[None]] = []  # writes nobody waits for (the backend's)

    def submit(self, job: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``job(*args)`` on the writer thread, after everything handed over before."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="embeddingcache-writer")
            return self._pool.submit(job, *args)

    def submit_unawaited(self, job: Callable[..., None], *args: Any) -> None:
        """Run ``job(*args)`` on the writer thread with nobody waiting for it: a failure is
        logged. At most `REMOTE_WRITES_AHEAD` such writes wait at once; beyond that this
        waits for the oldest, so that memory stays bounded."""
        with self._lock:
            self._unawaited = [f for f in self._unawaited if not f.done()]
            pending = self._unawaited
            waiting = pending[: max(0, len(pending) - REMOTE_WRITES_AHEAD + 1)]
        for earlier in waiting:
            wait([earlier])
        future = self.submit(job, *args)
        future.add_done_callback(_log_failed_write)
        with self._lock:
            self._unawaited.append(future)

    def store_rows(self, rows: Rows, *, announce: bool = True) -> np.ndarray:
        """Store fresh vectors (insert-or-ignore) in one `Store.put`, with what each cost in
        tokens; return the vectors as stored.

        Another call may have stored some of these texts first, its vectors computed in
        another batch and so different in the last bits: the stored ones are returned, so
        that every caller gets the same vector for a text, always. ``announce`` warns of the
        damaged rows replaced (a caller that said so already passes false).
        """
        if rows.replace and announce:
            degraded(
                f"{len(rows.replace)} stored vector(s) of model {rows.model!r} had the wrong "
                "length; recomputed and replaced them"
            )
        bad = first_non_finite(rows.vectors)
        if bad is not None:
            raise StorageError(
                f"model {rows.model!r} gave a vector with NaN or infinite values for "
                f"{rows.texts[bad][:80]!r}; refusing to store or return it"
            )
        shard = rows.target.shard
        try:
            tokens, exact = rows.cost
            kept = self.storage.put(
                shard,
                rows.keys,
                rows.texts,
                rows.vectors,
                replace=rows.replace,
                revision=rows.target.version,
                tokens=tokens,
                tokens_exact=exact,
            )
            # Read back only when another writer stored some first: when none was, the
            # vectors given are the ones stored (a read of every slice cost a tenth of a
            # fast model's time: issue 17).
            stored = self.storage.lookup(shard, rows.keys) if kept else None
            self.policy.worked = True
        except StorageError as exc:
            if not self.policy.degrades(exc):
                raise
            # A write transaction is all or nothing: what was not stored is simply not there.
            missing = self._unstored(shard, rows.keys)
            self.counters.add(not_stored=missing)
            degraded(f"could not store {missing} vector(s) ({exc}); returning them as computed")
            return np.asarray(rows.vectors, dtype=np.float32)
        self.policy.keep_within()
        if stored is None:
            return np.asarray(rows.vectors, dtype=np.float32)
        if len(stored.positions) == len(rows.keys):
            return stored.vectors
        vectors = np.array(rows.vectors, dtype=np.float32)
        vectors[stored.positions] = stored.vectors
        return vectors

    def _unstored(self, shard: str, keys: Sequence[bytes]) -> int:
        """How many of ``keys`` a failed write left unstored: a write of more than
        ``WRITE_BATCH`` rows commits each batch on its own, so the first ones may be in."""
        try:
            return len(keys) - len(self.storage.held(shard, keys))
        except StorageError:  # the store cannot be read either: count them all
            return len(keys)

    def close(self) -> None:
        """Wait for every write handed over, then let the thread go."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def store_new(
    store: Store,
    model: str,
    embedded: Sequence[str],
    vectors: np.ndarray,
) -> int:
    """Store vectors computed elsewhere for the embedded strings the shard lacks (a stored
    vector is kept; a damaged one, of the wrong length, is replaced); how many rows were
    inserted (not those another writer stored between the lookup and the write). A string
    repeated keeps its first vector.

    Raises:
        InvalidInputError: a vector holds NaN or infinite values (nothing is stored).
        StorageError: the shard could not be read or written (see `Store.put`).
    """
    bad = first_non_finite(vectors)
    if bad is not None:
        raise InvalidInputError(
            f"the vector of {embedded[bad][:80]!r} holds NaN or infinite values; nothing stored"
        )
    keys = keys_of(embedded)
    firsts, _ = dedupe(keys)
    distinct = [keys[i] for i in firsts]
    found = store.lookup(model, distinct)
    damaged = {distinct[u] for u in found.damaged}
    stored = np.zeros(len(distinct), dtype=bool)
    stored[found.positions] = True
    new = [firsts[u] for u in np.flatnonzero(~stored)]
    if not new:
        return 0
    if damaged:
        logger.warning("replacing %d damaged vector(s) of model %r", len(damaged), model)
    new_keys = [keys[i] for i in new]
    kept = store.put(
        model,
        new_keys,
        [embedded[i] for i in new],
        np.asarray(vectors)[new],
        replace=[key for key in new_keys if key in damaged],
    )
    return len(new) - kept


def _log_failed_write(future: Future[None]) -> None:
    """A write nobody waits for failed on the writer thread (the backend's vectors: the
    backend still holds them, and a later call asks it again)."""
    exc = None if future.cancelled() else future.exception()
    if exc is not None:
        logger.warning("could not store the backend's vectors here: %s", exc)
