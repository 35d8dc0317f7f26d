"""Removing entries: a model's, those unused for a while, or the least recently used ones
until the cache fits a size budget; then the texts no shard refers to any longer and, on
SQLite, the freed space.

Last use is known to the day (see ``store.py``); entries last used on the same day go
oldest-created first. Sizes are bytes on disk, write-ahead logs included. On Postgres freed
space stays with the database for reuse (autovacuum), so a size budget applies to SQLite
caches only.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from sqlalchemy import exc as sa_exc

from ..errors import InvalidInputError, StorageError
from ..versions import model_of
from .faults import disk_full
from .layout import SQLiteLayout
from .places import ShardPlace
from .retry import retry_write
from .room import allocated_bytes, least_recently_written, remove_shard, truncate_logs
from .sqlite import SHARD_PAGE_SIZE, compact, write_transaction
from .store import Store
from .tables import READ_CHUNK, shard_table, text_table

__all__ = ["PruneReport", "prune"]

NO_ROOM_HINT = (
    "; no room left on the disk, and this prune may remove no shard whole to make some: "
    "prune by size or by model, or free space"
)
# Rounds of remove-then-measure for a size budget: the first removes by an estimate of
# each entry's share of the files, the next ones correct it with the measured sizes.
MAX_ROUNDS = 4


@dataclass(frozen=True)
class PruneReport:
    """What `prune` removed (or, on a dry run, would remove)."""

    removed: dict[str, int] = field(default_factory=dict)
    """The vectors removed, per model."""
    texts_removed: int = 0
    """The texts removed because no shard refers to them any longer."""
    bytes_before: int = 0
    """The cache's bytes on disk before."""
    bytes_after: int = 0
    """Its bytes on disk after: measured, or on a dry run estimated."""
    dry_run: bool = False
    """Whether nothing was removed, only counted."""

    @property
    def vectors_removed(self) -> int:
        """The vectors removed, all models together."""
        return sum(self.removed.values())


@dataclass
class _Shard:
    place: ShardPlace
    model: str
    entries: int
    bytes: int


def prune(
    store: Store,
    *,
    model: str | None = None,
    older_than_s: float | None = None,
    max_size: int | None = None,
    dry_run: bool = False,
    shards: Sequence[str] | None = None,
) -> PruneReport:
    """Remove entries from the cache.

    ``model`` limits the removal to that model's shards (every version of it), and alone
    removes all of them. ``shards`` removes those shards whole (stale model versions).
    ``older_than_s`` removes entries not used for that many seconds. ``max_size`` then removes
    the least recently used entries until the cache takes at most that many bytes on disk.
    Texts that no shard refers to any longer go too; the SQLite files that changed are
    compacted.

    Raises:
        InvalidInputError: nothing to prune by, an unknown model, or a size budget for a
            database other than SQLite.
        StorageError: the cache could not be read or written.
    """
    if model is None and older_than_s is None and max_size is None and shards is None:
        raise InvalidInputError("say what to prune: a model, a maximum age or a maximum size")
    if max_size is not None and not isinstance(store.layout, SQLiteLayout):
        raise InvalidInputError(
            "a size budget needs a SQLite cache directory: a database keeps the space of "
            "removed rows for reuse, so its size does not fall; prune it by model or by age"
        )
    store.flush()  # last use that waits in memory counts

    def run() -> PruneReport:
        if shards is not None:
            return _remove_whole(store, _shards(store), set(shards), dry_run)
        return _prune(store, model, older_than_s, max_size, dry_run)

    try:
        try:
            return run()
        except (sa_exc.SQLAlchemyError, StorageError) as exc:
            if dry_run or not _full(store, exc) or not isinstance(store.layout, SQLiteLayout):
                _reraise(store, exc)
        return _making_room(store, run, _removable(store, model, max_size, older_than_s, shards))
    finally:
        if not dry_run:  # what was removed is never served from memory afterwards
            store.memory.clear()


def _full(store: Store, exc: BaseException) -> bool:
    return disk_full(exc, store.layout.out_of_room)


def _reraise(store: Store, exc: Exception, hint: str = "") -> NoReturn:
    """Raise ``exc`` as a `StorageError` naming the cache (as it is, when it is one and
    there is no ``hint`` to add)."""
    if isinstance(exc, StorageError) and not hint:
        raise exc
    reason = str(exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc)
    if not isinstance(exc, StorageError):
        reason = f"cannot prune the cache at {store.layout.describe()}: {reason}"
    raise StorageError(f"{reason}{hint}") from exc


def _making_room(
    store: Store, run: Callable[[], PruneReport], removable: list[ShardPlace]
) -> PruneReport:
    """`prune` on a disk with no room left (see `room`): empty the logs that can be, try
    again, and while there is still no room remove the least recently written shard of
    ``removable`` whole, then try again."""
    bytes_before = allocated_bytes(store)
    truncate_logs(store)
    removed: dict[str, int] = {}
    while True:
        try:
            report = run()
            break
        except InvalidInputError:
            if not removed:
                raise
            # The model's every shard was removed whole: that was the prune.
            report = PruneReport({}, _drop_orphan_texts(store, None), 0, 0)
            break
        except (sa_exc.SQLAlchemyError, StorageError) as exc:
            candidates = least_recently_written(removable)
            if not _full(store, exc):
                _reraise(store, exc)
            if not candidates:
                _reraise(store, exc, NO_ROOM_HINT)
            model, entries = remove_shard(store, candidates[0])
            removable.remove(candidates[0])
            removed[model] = removed.get(model, 0) + entries
    for name, count in report.removed.items():
        removed[name] = removed.get(name, 0) + count
    return PruneReport(removed, report.texts_removed, bytes_before, store.total_bytes())


def _removable(
    store: Store,
    model: str | None,
    max_size: int | None,
    older_than_s: float | None,
    shards: Sequence[str] | None,
) -> list[ShardPlace]:
    """The shards a prune may remove whole to make room: those it was asked to empty, or
    under a size budget any of its scope (a prune by age alone removes none whole)."""
    layout = store.layout
    if shards is not None:
        return [layout.shard_place(name) for name in shards]
    if model is None:
        return layout.shard_places() if max_size is not None else []
    if max_size is None and older_than_s is not None:
        return []
    own = layout.shard_place(model)  # found without a read: none may be possible
    return [p for p in layout.shard_places() if p.path == own.path or _of_model(p, model)]


def _of_model(place: ShardPlace, model: str) -> bool:
    """Whether a shard holds a version of ``model`` (``False`` when it cannot be read)."""
    try:
        with place.engine.connect() as connection:
            row = shard_table(place).info(connection)
    except sa_exc.SQLAlchemyError:
        return False
    return row is not None and model_of(row.model) == model


def _prune(
    store: Store,
    model: str | None,
    older_than_s: float | None,
    max_size: int | None,
    dry_run: bool,
) -> PruneReport:
    shards = _shards(store)
    scope = [s for s in shards if model is None or model_of(s.model) == model]
    if model is not None and not scope:
        raise InvalidInputError(f"nothing is stored for model {model!r}")
    bytes_before = store.total_bytes()
    share = _text_share(store)

    if model is not None and older_than_s is None and max_size is None:
        return _remove_whole(store, shards, {s.model for s in scope}, dry_run)

    chosen: dict[str, list[bytes]] = {}
    if older_than_s is not None:
        cutoff = int(time.time() - older_than_s)
        for shard in scope:
            if keys := _unused_since(shard.place, cutoff):
                chosen[shard.model] = keys
    if dry_run:
        # An estimate by each entry's share of the files as they are now.
        estimate = store.live_bytes() - _estimate(shards, chosen, share)
        if max_size is not None and estimate > max_size:
            more = _least_recently_used(scope, chosen, estimate - max_size, shards, share)
            for name, keys in more.items():
                chosen.setdefault(name, []).extend(keys)
            estimate -= _estimate(shards, more, share)
        would = {name: len(keys) for name, keys in chosen.items() if keys}
        return PruneReport(would, 0, bytes_before, max(estimate, 0), dry_run=True)

    removed: dict[str, int] = {}
    dirty = _remove(scope, chosen, removed)  # shards changed since they were compacted
    # Every text left without a vector: those of the entries just removed, and any earlier
    # ones (a crash between a writer's two transactions). Under a size budget they go before
    # any vector, since they take room that costs none.
    texts = _drop_orphan_texts(store, None)
    if max_size is not None:
        # The budget counts pages in use, write-ahead logs left out (see Layout.live_bytes).
        # Files of randomly placed keys are about a third free space inside their pages, so
        # each entry's share is measured on compacted files: compact the shards that may
        # lose entries, measure, remove the least recently used by that measure, and again
        # if a text shared with another model freed less than its share.
        for _ in range(MAX_ROUNDS):
            if store.live_bytes() <= max_size:
                break
            _compact(store, [s.place for s in scope], texts=True)
            dirty = {}
            shards = _shards(store)
            scope = [s for s in shards if model is None or s.model == model]
            excess = store.live_bytes() - max_size
            if excess <= 0 or not any(s.entries for s in scope):
                break
            # Files shrink by whole pages: ask for two pages more than the excess, or the
            # last rounds free entries that fit in a page's slack and nothing else.
            lru = _least_recently_used(
                scope, {}, excess + 2 * SHARD_PAGE_SIZE, shards, _text_share(store)
            )
            dirty = _remove(scope, lru, removed)
            texts += _drop_orphan_texts(store, [k for keys in lru.values() for k in keys])
        if store.total_bytes() > max_size:
            # The pages in use fit and the write-ahead logs beside them do not (a log keeps
            # copies of the pages writers changed, and a batch's index entries lie on pages
            # all over the file): compacting empties them.
            _compact(store, [s.place for s in scope], texts=True)
            dirty = {}
    return _finish(store, removed, texts, bytes_before, list(dirty.values()))


def _remove_whole(
    store: Store, shards: Sequence[_Shard], names: set[str], dry_run: bool
) -> PruneReport:
    """Remove the named shards' every vector, and the texts only they used."""
    scope = [s for s in shards if s.model in names]
    bytes_before = store.total_bytes()
    removed = {s.model: s.entries for s in scope}
    if dry_run:
        freed = sum(s.bytes for s in scope) + int(_text_share(store) * sum(removed.values()))
        return PruneReport(removed, 0, bytes_before, max(bytes_before - freed, 0), True)
    if not scope:
        return PruneReport({}, 0, bytes_before, bytes_before)
    emptied = [shard.place for shard in scope if _empty(store, shard)]
    texts = _drop_orphan_texts(store, None)
    return _finish(store, removed, texts, bytes_before, emptied)


def _remove(
    scope: Sequence[_Shard], chosen: dict[str, list[bytes]], removed: dict[str, int]
) -> dict[str, ShardPlace]:
    """Delete the chosen vectors, counting them in ``removed``; the shards that changed."""
    changed = {}
    for shard in scope:
        keys = chosen.get(shard.model, [])
        if keys:
            _delete(shard, keys)
            removed[shard.model] = removed.get(shard.model, 0) + len(keys)
            changed[shard.model] = shard.place
    return changed


def _finish(
    store: Store,
    removed: dict[str, int],
    texts: int,
    bytes_before: int,
    changed: Sequence[ShardPlace],
) -> PruneReport:
    """Compact what changed since it was last compacted, and say what was done."""
    _compact(store, changed, texts=texts > 0)
    return PruneReport(removed, texts, bytes_before, store.total_bytes())


def _shards(store: Store) -> list[_Shard]:
    found = []
    for place in store.layout.shard_places():
        if not store.exists(place):
            continue
        table = shard_table(place)
        with place.engine.connect() as connection:
            info = table.info(connection)
            entries = table.count(connection)
        if info is not None:
            found.append(_Shard(place, info.model, entries, store.layout.live_bytes(place)))
    return found


def _text_share(store: Store) -> float:
    """The bytes on disk of one text, on average (0 with no texts)."""
    texts = store.text_count()
    return store.layout.live_bytes(store.layout.text_place()) / texts if texts else 0.0


def _estimate(shards: Sequence[_Shard], chosen: dict[str, list[bytes]], share: float) -> int:
    """Bytes that removing ``chosen`` frees, by each shard's bytes per entry and each text's."""
    return int(
        sum(
            (s.bytes / s.entries + share) * len(chosen.get(s.model, ()))
            for s in shards
            if s.entries
        )
    )


def _unused_since(place: ShardPlace, cutoff: int) -> list[bytes]:
    with place.engine.connect() as connection:
        return shard_table(place).unused_since(connection, cutoff)


def _least_recently_used(
    scope: Sequence[_Shard],
    chosen: dict[str, list[bytes]],
    excess: int,
    shards: Sequence[_Shard],
    share: float,
) -> dict[str, list[bytes]]:
    """Keys to remove, least recently used first across the shards, until about ``excess``
    bytes are freed."""
    cost = {s.model: s.bytes / s.entries + share for s in shards if s.entries}
    taken = {name: set(keys) for name, keys in chosen.items()}
    more: dict[str, list[bytes]] = {}
    freed = 0.0
    streams = [_by_use(s) for s in scope]
    try:
        for _last_used, _created_at, name, key in heapq.merge(*streams):
            if key in taken.get(name, ()):
                continue
            more.setdefault(name, []).append(key)
            freed += cost[name]
            if freed >= excess:
                break
    finally:
        for stream in streams:
            stream.close()  # ends each shard's read now, before anything is deleted
    return more


def _by_use(shard: _Shard) -> Generator[tuple[int, int, str, bytes], None, None]:
    with shard.place.engine.connect() as connection:
        for last_used, created_at, key in shard_table(shard.place).by_use(connection):
            yield last_used, created_at, shard.model, key


def _delete(shard: _Shard, keys: Sequence[bytes]) -> None:
    table = shard_table(shard.place)
    # One short transaction per chunk: a writer waits for the lock a moment only.
    for start in range(0, len(keys), READ_CHUNK):
        part = list(keys[start : start + READ_CHUNK])

        def run(part: list[bytes] = part) -> None:
            with write_transaction(shard.place.engine) as connection:
                table.delete(connection, part)

        retry_write(run)


def _empty(store: Store, shard: _Shard) -> bool:
    """Remove every vector of a shard and its model row: the name is free for a model of
    another dimension. The file or schema stays, so that other processes using it keep
    working (a deleted file would keep its readers and writers on a vanished inode); unless
    the disk has no room to write the removal: the file then goes (see `room`), and the
    answer is ``False``."""

    def run() -> None:
        with write_transaction(shard.place.engine) as connection:
            shard_table(shard.place).empty(connection)

    try:
        retry_write(run)
    except sa_exc.SQLAlchemyError as exc:
        if not _full(store, exc) or shard.place.path is None:
            raise
        remove_shard(store, shard.place)
        return False
    store.forget(shard.model)
    return True


def _drop_orphan_texts(store: Store, candidates: Sequence[bytes] | None) -> int:
    """Remove texts that no shard refers to: among ``candidates``, or all of them."""
    place = store.layout.text_place()
    if not store.exists(place):
        return 0
    shards = [p for p in store.layout.shard_places() if store.exists(p)]
    table = text_table(place)
    removed = 0
    for keys in _chunks(store, candidates):
        referred = _referred(shards, keys)
        orphans = [key for key in keys if key not in referred]
        if orphans:

            def run(orphans: list[bytes] = orphans) -> int:
                with write_transaction(place.engine) as connection:
                    # Said before the check where the backend has no lock that makes a
                    # writer wait (Postgres): a writer reading the count after this puts
                    # its texts back; one that read it before stored its vectors before, and
                    # the check below sees them.
                    table.removing(connection)
                    # Again under the texts' write lock: a writer may have stored a vector
                    # since; it puts its texts back only after, and must wait for this lock.
                    still = set(orphans).difference(_referred(shards, orphans))
                    if still:
                        table.delete(connection, list(still))
                    return len(still)

            removed += retry_write(run)
    return removed


def _referred(shards: Sequence[ShardPlace], keys: list[bytes]) -> set[bytes]:
    """The keys of ``keys`` that some shard holds a vector for."""
    referred: set[bytes] = set()
    for shard in shards:
        with shard.engine.connect() as connection:
            referred |= shard_table(shard).holding(connection, keys)
    return referred


def _chunks(store: Store, candidates: Sequence[bytes] | None) -> Iterator[list[bytes]]:
    if candidates is not None:
        for start in range(0, len(candidates), READ_CHUNK):
            yield list(candidates[start : start + READ_CHUNK])
        return
    # Every text, in key order, a chunk at a time (keyset pagination: the deletes between
    # chunks do not shift it).
    place = store.layout.text_place()
    table = text_table(place)
    last = b""
    while True:
        with place.engine.connect() as connection:
            keys = table.keys_after(connection, last, READ_CHUNK)
        if not keys:
            return
        last = keys[-1]
        yield keys


def _compact(store: Store, places: Sequence[ShardPlace], *, texts: bool) -> None:
    if not isinstance(store.layout, SQLiteLayout):
        return  # Postgres: autovacuum makes the space reusable
    for place in places:
        compact(place.engine)
    if texts:
        compact(store.layout.text_place().engine)
