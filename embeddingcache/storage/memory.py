"""The memory tier: the vectors this process served or stored last, by shard and key, within a
budget of bytes (issue 32).

A stored vector never changes for its key in its shard (a shard is one model at one version,
of one dimension), so a copy held in memory answers as the file would, without a query. What
makes that true here:

- an entry is keyed by the shard's name, which holds the model's version, and its key: a
  version change looks up another shard, never this one's entries;
- a hit is served only when its length is the shard's dimension, and its version the
  shard's, as this process knows them (a shard emptied by a prune may be taken by another
  version of its model);
- a write fills an entry only when the store kept the vector given (not another writer's),
  and drops the keys it replaces;
- a prune, a shard this process forgets (removed, emptied, moved aside) and ``close`` drop
  the entries: `Store` calls `forget` and `clear`.

A prune by another process is not seen: that process removed a vector that is still the
right one, and this process serves it until it leaves the tier (a later miss recomputes it).

Only small reads and writes fill it (`FILL_MAX` keys at most): hot texts come one request at
a time, and a batch of thousands would cost its hit path the copies and evict every hot
entry. Thread-safe; least recently used entries leave first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

__all__ = [
    "DEFAULT_MEMORY_SIZE",
    "ENTRY_OVERHEAD",
    "FILL_MAX",
    "STALE_S",
    "Memory",
    "Remembered",
]

DEFAULT_MEMORY_SIZE = 4 * 2**20  # 4 MiB: about 2,600 384-d vectors, 1,300 768-d ones
FILL_MAX = 16  # reads and writes of at most this many keys fill the tier
# What an entry costs besides its vector: the key, the tuples, the dict slot (measured with
# tracemalloc on CPython 3.11: about 330 bytes for a 64-byte key).
ENTRY_OVERHEAD = 352
# A last use older than this is noted again (the store's ``TOUCH_RESOLUTION_S``: a day).
STALE_S = 24 * 3600


class Remembered(NamedTuple):
    """One vector held in memory: its stored bytes, the model version its shard recorded
    when it was read or written (``None``: none recorded), what it cost in tokens
    (``None``: not recorded), and its last use as the store knows it (Unix seconds)."""

    vector: bytes
    version: str | None
    tokens: int | None
    last_used: int


class Memory:
    """Vectors by ``(shard, key)``, at most ``budget`` bytes of them (0: none held)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._entries: OrderedDict[tuple[str, bytes], Remembered] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, shard: str, key: bytes) -> Remembered | None:
        """The entry of ``key`` in ``shard``, now the most recently used; ``None``."""
        if not self._entries:  # nothing held (or the tier is off): no lock taken
            return None
        with self._lock:
            found = self._entries.get((shard, key))
            if found is not None:
                self._entries.move_to_end((shard, key))
            return found

    def put(self, shard: str, entries: Iterable[tuple[bytes, Remembered]]) -> None:
        """Hold ``(key, entry)`` pairs of ``shard``, the least recently used leaving to stay
        within the budget."""
        if not self.budget:
            return
        with self._lock:
            for key, entry in entries:
                size = _size(entry)
                if size > self.budget:
                    continue
                old = self._entries.pop((shard, key), None)
                if old is not None:
                    self._bytes -= _size(old)
                self._entries[(shard, key)] = entry
                self._bytes += size
            while self._bytes > self.budget:
                _, gone = self._entries.popitem(last=False)
                self._bytes -= _size(gone)

    def recall(
        self, shard: str, key: bytes, dimension: int, version: str | None, *, now: int
    ) -> tuple[Remembered, bool] | None:
        """The entry of ``key`` when it is of the shard's ``dimension`` and ``version`` as
        the caller knows them, and whether its last use was older than `STALE_S` (it is now
        ``now``: the caller notes the use, as a read from the file would); else ``None``."""
        found = self.get(shard, key)
        if found is None or len(found.vector) != 4 * dimension or found.version != version:
            return None
        if found.last_used >= now - STALE_S:
            return found, False
        with self._lock:
            if (shard, key) in self._entries:
                self._entries[(shard, key)] = found._replace(last_used=now)
        return found, True

    def read(
        self,
        shard: str,
        rows: Sequence[tuple[bytes, bytes, int, int | None]],
        *,
        dimension: int,
        version: str | None,
        now: int,
    ) -> None:
        """Hold the rows ``(key, vector, last_used, tokens)`` a small read found (`FILL_MAX`
        keys at most; those of the shard's ``dimension``), as used ``now`` when their use
        was stale (the read noted it)."""
        if self.budget and len(rows) <= FILL_MAX:
            self.put(
                shard,
                [
                    (key, Remembered(bytes(vector), version, tokens, _used(used, now)))
                    for key, vector, used, tokens in rows
                    if len(vector) == 4 * dimension
                ],
            )

    def written(
        self,
        shard: str,
        rows: Sequence[dict[str, Any]],
        version: str | None,
        *,
        kept: int,
        replace: Sequence[bytes],
    ) -> None:
        """After a write of ``rows`` (`Store.put`'s) that kept ``kept`` stored before and
        replaced ``replace``: the replaced keys dropped, and a small write held when every
        vector given is the one stored."""
        if replace:
            self.drop(shard, replace)
        if not kept and len(rows) <= FILL_MAX:
            self.put(
                shard,
                [
                    (r["hashid"], Remembered(r["vector"], version, r["tokens"], r["last_used"]))
                    for r in rows
                ],
            )

    def drop(self, shard: str, keys: Iterable[bytes]) -> None:
        """Forget these keys of ``shard``."""
        with self._lock:
            for key in keys:
                gone = self._entries.pop((shard, key), None)
                if gone is not None:
                    self._bytes -= _size(gone)

    def forget(self, shard: str) -> None:
        """Forget every entry of ``shard``."""
        with self._lock:
            for held in [k for k in self._entries if k[0] == shard]:
                self._bytes -= _size(self._entries.pop(held))

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    @property
    def size(self) -> int:
        """The bytes held, as the budget counts them."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)


def _size(entry: Remembered) -> int:
    return len(entry.vector) + ENTRY_OVERHEAD


def _used(last_used: int, now: int) -> int:
    """A read row's last use as the store knows it after the read: ``now`` when it was
    stale (the read noted it), else as stored."""
    return last_used if last_used >= now - STALE_S else now
