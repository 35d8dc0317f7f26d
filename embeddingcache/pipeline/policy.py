"""When a call goes on without its storage, and keeping the cache within ``max_size``.

A storage fault after the storage worked (a database gone, a disk full) costs a call its
caching, never its vectors: it degrades with a warning. A storage that never worked is more
likely misconfigured, and that is an error to fix; unless the error itself says it is a fault
of the machine (a full disk: `storage.faults`), which degrades in a fresh process too.
"""

from __future__ import annotations

import logging
import threading

from .._util import warn
from ..errors import DimensionMismatchError, ShardMismatchError, StorageError
from ..storage import Store
from ..storage.evict import PruneReport, prune
from ..storage.faults import is_fault
from ..storage.store import ReadOnlyStorageError

__all__ = ["LOW_WATER", "StoragePolicy", "degraded"]

logger = logging.getLogger("embeddingcache")

# With max_size, a cache that outgrows it is pruned to this share of it, so that pruning
# (and compacting the files) happens once per tenth of the budget written, not per write.
LOW_WATER = 0.9


def degraded(message: str) -> None:
    """Say that the cache could not do its part of a call that still succeeds."""
    logger.warning(message)
    warn(message)


class StoragePolicy:
    """Whether a storage fault degrades a call, and the size budget (thread-safe)."""

    def __init__(self, storage: Store, *, max_size: int | None = None) -> None:
        self.storage = storage
        self.max_size = max_size
        self.pruning = threading.Lock()  # one prune at a time
        self.worked = False  # it was read from or written to: see degrades

    def degrades(self, exc: StorageError) -> bool:
        """Whether a call goes on without its storage after ``exc``: when the storage worked
        before in this cache (a fault that came up, which may pass), or when the error is a
        fault whatever came before (a full disk, said by the driver or, where SQLite could
        not create a file, by the file system: `storage.faults.is_fault`). A storage that
        never worked, for another reason, is more likely misconfigured (a wrong path, URL or
        password, a database that refuses writes): that is an error to fix. A shard of
        another model or dimension is always an error."""
        if isinstance(exc, ReadOnlyStorageError):
            return True  # a cache on read-only media serves its hits; misses are computed
        if isinstance(exc, (ShardMismatchError, DimensionMismatchError)):
            return False
        # A full disk in a fresh process (a new run, every CLI run) is no mistake to fix
        # first: discarding what the call computed would help no one (issue 30).
        return self.worked or is_fault(exc, self.storage.layout.out_of_room)

    def prune(self, **options: object) -> PruneReport:
        """`embeddingcache.storage.evict.prune` of this store, one prune at a time."""
        with self.pruning:
            return prune(self.storage, **options)  # type: ignore[arg-type]

    def keep_within(self) -> None:
        """With ``max_size``, prune the least recently used entries once the stored data
        outgrows it. A failure is a warning: the caller's vectors are stored, and the next
        write tries again."""
        budget = self.max_size
        if budget is None:
            return
        try:
            if self.storage.live_bytes() <= budget:
                return
            with self.pruning:  # one thread prunes; the others find the cache within budget
                if self.storage.live_bytes() <= budget:
                    return
                report = prune(self.storage, max_size=int(budget * LOW_WATER))
        except StorageError as exc:
            degraded(f"could not prune the cache to max_size={budget} ({exc})")
            return
        logger.info(
            "the cache outgrew max_size=%d: removed the %d least recently used vector(s), "
            "%d -> %d bytes",
            budget,
            report.vectors_removed,
            report.bytes_before,
            report.bytes_after,
        )
