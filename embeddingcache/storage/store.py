"""Batched reads and writes of texts and vectors, over the places a layout gives.

Reads are one ``IN (...)`` query per chunk of keys and one numpy reassembly. Writes are
insert-or-ignore in one transaction per batch, retried on transient errors. Nothing here
creates an ORM object, and a read never writes.

Use (hits, misses, last use) is recorded by the store's log, `usage.UseLog`.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import Connection
from sqlalchemy import exc as sa_exc

from .._util import first_non_finite
from .._version import __version__
from ..errors import DimensionMismatchError, ShardMismatchError, StorageError
from . import migrate, tables
from .faults import disk_full
from .layout import Layout, ShardReader
from .memory import DEFAULT_MEMORY_SIZE, Memory
from .places import Place, ShardPlace
from .retry import retry_write
from .sqlite import is_not_a_database, move_aside, write_transaction
from .tables import READ_CHUNK, WRITE_BATCH, HitRow, ShardTable, shard_table, text_table
from .usage import TOUCH_RESOLUTION_S, UseLog

__all__ = [
    "READ_CHUNK",
    "WRITE_BATCH",
    "Lookup",
    "ModelInfo",
    "ReadOnlyStorageError",
    "ShardSummary",
    "Store",
    "entries",
]

logger = logging.getLogger("embeddingcache.storage")

DTYPE = "float32"
_FIRST = np.zeros(1, dtype=np.intp)  # the positions of a lookup of one key that was found
_FIRST.flags.writeable = False


class ReadOnlyStorageError(StorageError):
    """The cache's files cannot be written here (a read-only mount, a cache baked into an
    image): hits are served, nothing is stored, and a call computes its misses."""


@dataclass(frozen=True)
class ModelInfo:
    """The sanity row of a model shard."""

    model: str
    dimension: int
    dtype: str
    library_version: str
    revision: str | None = None
    """The model's version (`embeddingcache.versions`) the shard holds vectors of."""
    counts_tokens: bool = False
    """Whether vectors of the shard have their cost in tokens recorded: its lookups read it."""


class Lookup(NamedTuple):
    """What a read found: ``vectors[j]`` is the vector of ``keys[positions[j]]``, and
    ``positions`` ascends.

    ``damaged`` lists positions whose stored vector has the wrong length: to be recomputed.
    ``tokens`` is what the vectors found cost when computed, over those whose cost is
    stored: the tokens a hit saves paying for again.
    """

    positions: np.ndarray
    vectors: np.ndarray
    damaged: list[int]
    tokens: int = 0

    @classmethod
    def empty(cls, dimension: int = 0) -> Lookup:
        return cls(np.empty(0, dtype=np.intp), np.empty((0, dimension), dtype=np.float32), [])


@dataclass(frozen=True)
class ShardSummary:
    """One model shard, as `EmbeddingCache.contents` reports it."""

    place: str
    """The file, or the Postgres schema, that holds the shard."""
    model: str | None
    """Its model (``None`` once `prune` emptied it)."""
    dimension: int | None
    """The length of its vectors."""
    entries: int
    """The vectors it holds."""
    bytes_on_disk: int
    """The file and its write-ahead log, or the Postgres relation size."""
    library_version: str | None = None
    """The embeddingcache that created the shard."""
    created_at: int | None = None
    """When it was created, in Unix seconds."""
    hits: int = 0
    """Lookups that found a vector, counted across every run (see docs/storage.md)."""
    misses: int = 0
    """Lookups that did not."""
    revision: str | None = None
    """The version of the model its vectors are of (`embeddingcache.versions`): a later
    version of a model has a shard of its own, named ``<model>@<16 hex digits>``."""
    tokens_counted: int = 0
    """The vectors whose cost in tokens is recorded (see docs/storage.md: vectors stored
    before schema s0004, from a backend or a push, or of a local model, have none)."""
    tokens: int = 0
    """What those vectors cost, in tokens."""
    tokens_estimated: int = 0
    """The part of ``tokens`` that is an estimate (the engine had no tokenizer: see
    `embeddingcache.tokens`), not the tokenizer's count."""
    tokens_saved: int = 0
    """The recorded tokens of the hits, counted across every run: tokens served from the
    cache instead of being paid for again."""


@dataclass
class _Shard:
    table: ShardTable
    info: ModelInfo | None
    reader: ShardReader | None = None  # the hit path, outside SQLAlchemy

    @property
    def place(self) -> ShardPlace:
        return self.table.place

    @property
    def counting(self) -> bool:
        return self.info is not None and not self.info.counts_tokens


class Store:
    """Texts and one shard per model, in the places of a layout; the last vectors in memory."""

    def __init__(self, layout: Layout, *, memory_size: int = DEFAULT_MEMORY_SIZE) -> None:
        self.layout = layout
        self.memory = Memory(memory_size)
        self._shards: dict[str, _Shard] = {}
        self._prepared: set[object] = set()  # places this process found at the current schema
        self._lock = threading.Lock()
        self._use = UseLog(layout, self._shard_for_use, self._now_counting)

    # -- reads ----------------------------------------------------------------------------

    def info(self, model: str) -> ModelInfo | None:
        """The shard's sanity row, or ``None`` when nothing is stored for the model yet."""
        shard = self._open_shard(model)
        return shard.info if shard is not None else None

    def claim_revision(self, model: str, revision: str) -> str | None:
        """Record the model's version in a shard whose model row has none (the first check
        of a shard made before versions were recorded); the version it holds afterwards.
        A read-only shard records nothing: it answers ``revision``, as the check would."""
        shard = self._open_shard(model)
        if shard is None or shard.info is None:
            return None
        if shard.info.revision is not None:
            return shard.info.revision
        place = shard.place
        if self.layout.read_only(place):
            return revision
        try:
            with write_transaction(place.engine) as connection:
                held = shard.table.claim_revision(connection, revision)
        except sa_exc.SQLAlchemyError as exc:
            raise self.error(f"cannot record the version of {model!r}", exc) from exc
        with self._lock:
            info = dataclasses.replace(shard.info, revision=held)
            self._shards[model] = dataclasses.replace(shard, info=info)
        return held

    def lookup(self, model: str, keys: Sequence[bytes]) -> Lookup:
        """Find the stored vectors of distinct ``keys`` in the shard itself (what is stored,
        damaged rows included: never the memory tier, see `recall`); read-only."""
        shard = self._open_shard(model)
        if shard is None or shard.info is None or not keys:
            return Lookup.empty(shard.info.dimension if shard and shard.info else 0)
        dimension = shard.info.dimension
        width = 4 * dimension
        try:
            if shard.reader is not None:
                rows = shard.reader.rows(keys, tables.READ_CHUNK, tokens=shard.info.counts_tokens)
            else:
                with shard.place.engine.connect() as connection:
                    rows = shard.table.get(connection, keys)
        except (sa_exc.SQLAlchemyError, sqlite3.Error) as exc:
            if _vanished(exc):
                # Another process removed the file: nothing is stored; a write recreates it.
                self._forget(model, shard)
                return Lookup.empty(dimension)
            raise self.error(f"cannot read the shard of {model!r}", exc) from exc
        stale_before = int(time.time()) - TOUCH_RESOLUTION_S
        now = stale_before + TOUCH_RESOLUTION_S
        self.memory.read(model, rows, dimension=dimension, version=shard.info.revision, now=now)
        if len(rows) == len(keys) == 1 and len(rows[0][1]) == width:  # one cached text
            if rows[0][2] < stale_before:
                self._use.touch(model, [rows[0][0]])
            found = np.frombuffer(bytearray(rows[0][1]), "<f4")[None, :]
            return Lookup(_FIRST, found, [], rows[0][3] or 0)
        result, stale = _assembled(rows, keys, dimension, stale_before)
        if stale:
            self._use.touch(model, stale)
        return result

    def recall(self, model: str, key: bytes) -> Lookup | None:
        """A lookup of one key answered by the memory tier (`memory.Memory.recall`), its use
        noted as a read's; ``None`` when it holds no vector for the shard as known here."""
        info = shard.info if (shard := self._shards.get(model)) is not None else None
        found = None
        if info is not None:
            now = int(time.time())
            found = self.memory.recall(model, key, info.dimension, info.revision, now=now)
        if found is None:
            return None
        if found[1]:
            self._use.touch(model, [key])
        vector = np.frombuffer(bytearray(found[0].vector), "<f4")[None, :]
        return Lookup(_FIRST, vector, [], found[0].tokens or 0)

    def held(self, model: str, keys: Sequence[bytes]) -> set[bytes]:
        """The keys of ``keys`` the model's shard holds a vector for, its vectors unread."""
        shard = self._open_shard(model)
        if shard is None or shard.info is None or not keys:
            return set()
        try:
            with shard.place.engine.connect() as connection:
                return shard.table.holding(connection, keys)
        except sa_exc.SQLAlchemyError as exc:
            if _vanished(getattr(exc, "orig", None) or exc):  # removed: nothing is stored
                self._forget(model, shard)
                return set()
            raise self.error(f"cannot read the shard of {model!r}", exc) from exc

    def text_count(self) -> int:
        """Rows in the hashstring table (0 when it does not exist yet)."""
        place = self.layout.text_place()
        try:
            if not self._ready(place, create=False):
                return 0
            with place.engine.connect() as connection:
                return text_table(place).count(connection)
        except sa_exc.SQLAlchemyError as exc:
            raise self.error("cannot read the texts", exc) from exc

    def migrate(self) -> list[str]:
        """Bring every place present to the current schema; the names of the places."""
        places: list[Place] = [self.layout.text_place(), *self.layout.shard_places()]
        done = []
        try:
            for place in places:
                if self._ready(place, create=False):
                    done.append(place.name)
        except sa_exc.SQLAlchemyError as exc:
            raise self.error("cannot migrate the cache", exc) from exc
        return done

    def summaries(self) -> list[ShardSummary]:
        """One summary per model shard present, read-only."""
        result = []
        for place in self.layout.shard_places():
            try:
                if not self._ready(place, create=False):
                    continue
                table = shard_table(place)
                with place.engine.connect() as connection:
                    row = table.info(connection)
                    entries = table.count(connection)
                    totals = table.token_totals(connection)
            except (sa_exc.DBAPIError, StorageError) as exc:
                logger.warning("skipping shard %s: %s", place.name, exc)
                continue
            size = self.layout.bytes_on_disk(place)
            result.append(_summary(place.name, row, entries, size, totals))
        return result

    # -- use ------------------------------------------------------------------------------

    def record(self, model: str, hits: int, misses: int, tokens_saved: int = 0) -> None:
        """Count a lookup's hits and misses, and the tokens its hits saved (`Lookup.tokens`);
        writes what waits when it is due."""
        self._use.record(model, hits, misses, tokens_saved)

    def flush(self) -> None:
        """Write the counts and last-use times that wait (see `usage.UseLog.flush`)."""
        self._use.flush()

    def _shard_for_use(self, model: str) -> _Shard | None:
        """The model's shard, as it is now on disk: the use log writes to it."""
        shard = self._open_shard(model)
        if shard is not None and self.layout.replaced(shard.place):
            self._forget(model, shard)  # removed meanwhile: count in the file now there, if any
            shard = self._open_shard(model)
        return shard

    def _now_counting(self, model: str, shard: _Shard, row: Any) -> None:
        """Another process stored the shard's first counted vectors: its hits read them."""
        with self._lock:
            self._shards[model] = dataclasses.replace(shard, info=_model_info(row))

    # -- writes ---------------------------------------------------------------------------

    def put(
        self,
        model: str,
        keys: Sequence[bytes],
        texts: Sequence[str],
        vectors: np.ndarray,
        *,
        replace: Sequence[bytes] = (),
        revision: str | None = None,
        tokens: Sequence[int] | None = None,
        tokens_exact: bool = True,
    ) -> int:
        """Store texts and their vectors; rows already present are kept as they are, and
        their number returned (0: every vector given is the one stored now).
        ``revision`` is the model's version they were computed at, recorded in the shard's
        model row if it has none yet. ``tokens`` is what computing each vector cost (``None``:
        not known), ``tokens_exact`` whether those are the tokenizer's counts or estimates.

        Keys in ``replace`` are overwritten: their stored vectors were found damaged.
        Texts go in first: a crash between the two transactions leaves a text without a
        vector (a miss, recomputed), never a vector without its text; and once more after
        the vectors if a prune took texts in between (only then: the texts count their removals,
        in the SQLite file's header, in a Postgres sequence once a prune made it; before that,
        always). Rows go in write transactions of
        ``WRITE_BATCH``, so a writer holds the SQLite lock for a short while only, however
        many rows a call stores.

        Raises:
            DimensionMismatchError: the vectors' dimension differs from the shard's.
            ShardMismatchError: the shard belongs to another model.
            StorageError: the database refused the write after the retries.
        """
        if not keys:
            return 0
        matrix = _checked_matrix(vectors, len(keys))
        self._refuse_read_only(model)
        if len(keys) > tables.WRITE_BATCH:
            return sum(
                self.put(
                    model,
                    keys[part],
                    texts[part],
                    matrix[part],
                    replace=own,
                    revision=revision,
                    tokens=None if tokens is None else tokens[part],
                    tokens_exact=tokens_exact,
                )
                for part, own in _batches(keys, replace)
            )
        text_rows = [{"hashid": k, "text": t} for k, t in zip(keys, texts, strict=True)]
        vector_rows = _vector_rows(keys, matrix, tokens, tokens_exact, now=int(time.time()))
        try:
            return self._write(model, matrix.shape[1], text_rows, vector_rows, replace, revision)
        except sa_exc.SQLAlchemyError as exc:
            raise self.error("cannot write to the cache", exc) from exc

    def writable_shard(self, model: str) -> ShardPlace:
        """The model's shard, created or brought to the current schema for writing: where
        its claims live (`embeddingcache.storage.claims`), before any vector is stored.

        Raises:
            ReadOnlyStorageError: the shard cannot be written.
            StorageError: it cannot be opened.
        """
        place = self.layout.shard_place(model)
        if self.layout.read_only(place):
            _read_only_ready(self.layout, place, create=True)  # raises
        try:
            # Retried: processes that create a new shard file at once meet SQLite's lock
            # while one of them switches it to WAL ("database is locked").
            retry_write(lambda: self._ready(place, create=True))
        except sa_exc.SQLAlchemyError as exc:
            raise self.error(f"cannot open the shard of {model!r}", exc) from exc
        return place

    def _refuse_read_only(self, model: str) -> None:
        """Raise `ReadOnlyStorageError` before anything is written when the texts or the
        model's shard cannot be."""
        for place in (self.layout.text_place(), self.layout.shard_place(model)):
            if self.layout.read_only(place):
                _read_only_ready(self.layout, place, create=True)  # raises

    def _write(
        self,
        model: str,
        dimension: int,
        text_rows: list[dict[str, Any]],
        vector_rows: list[dict[str, Any]],
        replace: Sequence[bytes],
        revision: str | None,
    ) -> int:
        """`put`'s transactions, each retried: the texts, the vectors, and the texts again
        if a prune removed some in between; how many vectors were stored already."""
        removals = retry_write(lambda: self._put_texts(text_rows))
        kept = retry_write(
            lambda: self._put_vectors(model, dimension, vector_rows, replace, revision)
        )
        # Again, now that the vectors are in, if a prune removed texts between the two
        # transactions: it may have removed these (its check and its delete are one
        # transaction, so the texts are either seen with their vectors or put back here).
        # Where the backend counts removals, this is one read under the texts' write lock
        # (which waits for a prune at work); elsewhere every text is put again.
        retry_write(lambda: self._put_texts(text_rows, unless_removals=removals))
        return kept

    def _put_texts(
        self, rows: list[dict[str, Any]], *, unless_removals: int | None = None
    ) -> int | None:
        """Store text rows, unless ``unless_removals`` says no text was removed since; the
        texts' removal count (see ``TextTable.removals``)."""
        place = self.layout.text_place()
        self._ready(place, create=True)
        table = text_table(place)
        with write_transaction(place.engine) as connection:
            removals = table.removals(connection)
            if unless_removals is None or removals != unless_removals:
                table.put_new(connection, rows)
            return removals

    def _put_vectors(
        self,
        model: str,
        dimension: int,
        rows: list[dict[str, Any]],
        replace: Sequence[bytes],
        revision: str | None,
    ) -> int:
        """Store vector rows; how many were stored already (and kept)."""
        place = self.layout.shard_place(model)
        self._ready(place, create=True)
        table = shard_table(place)
        with write_transaction(place.engine) as connection:
            info = _ensure_info(connection, table, model, dimension, revision)
            if not info.counts_tokens and any(row["tokens"] is not None for row in rows):
                table.count_tokens(connection)
                info = dataclasses.replace(info, counts_tokens=True)
            if replace:
                table.delete(connection, replace)
            kept = table.put_new(connection, rows)
        with self._lock:
            self._shards[model] = _Shard(table, info, self.layout.reader(place))
        self.memory.written(model, rows, info.revision, kept=kept, replace=replace)
        return kept

    # -- opening --------------------------------------------------------------------------

    def _open_shard(self, model: str) -> _Shard | None:
        shard = self._shards.get(model)
        if shard is not None and shard.info is not None:
            return shard
        place = self.layout.shard_place(model)
        table = shard_table(place)

        def read() -> Any:
            if not self._ready(place, create=False):
                return None
            with place.engine.connect() as connection:
                return table.info(connection)

        try:
            # Retried: a file another process or thread is creating (a claim creates the
            # shard before its first vector) is locked while it is switched to WAL.
            row = retry_write(read)
        except sa_exc.SQLAlchemyError as exc:
            raise self.error(f"cannot read the shard of {model!r}", exc) from exc
        if row is None:
            return None
        info = _model_info(row)
        _check_model(info, model, place)
        shard = _Shard(table, info, self.layout.reader(place))
        with self._lock:
            self._shards[model] = shard
        return shard

    def _ready(self, place: Place, *, create: bool) -> bool:
        """Whether the place exists at the current schema; creates or upgrades it as needed.

        A SQLite file that is not a database is moved aside first (and, for a read, reported
        as not there).
        """
        token = (place.path, place.schema)
        if create and self.layout.replaced(place):
            # Removed or replaced by another process: write to the file now on disk (created
            # anew, with its tables), not to the unlinked one this process held open.
            with self._lock:
                self._prepared.discard(token)
                for model in [m for m, s in self._shards.items() if s.place is place]:
                    del self._shards[model]
                    self.memory.forget(model)
        if token in self._prepared:
            return True
        if not self.layout.may_exist(place) and not create:
            return False
        if self.layout.read_only(place):
            ready = _read_only_ready(self.layout, place, create=create)
            if ready:
                self._prepared.add(token)
            return ready
        if create:
            self.layout.prepare()
        try:
            ready = migrate.ensure(place, create=create)
        except sa_exc.DatabaseError as exc:
            if not is_not_a_database(exc) or place.path is None:
                raise
            place.engine.dispose()
            if isinstance(place, ShardPlace) and (reader := self.layout.reader(place)):
                reader.close()
            move_aside(place.path)
            ready = migrate.ensure(place, create=create)
        if ready:
            self._prepared.add(token)
        return ready

    def exists(self, place: Place) -> bool:
        """Whether a place holds tables (brought to the current schema if it does)."""
        try:
            return self._ready(place, create=False)
        except sa_exc.SQLAlchemyError as exc:
            raise self.error(f"cannot open {place.name}", exc) from exc

    def forget(self, model: str) -> None:
        """Drop what this process knows of a model's shard (after its rows were removed, or
        its file: the next write creates it anew)."""
        place = self.layout.shard_place(model)
        self.memory.forget(model)
        with self._lock:
            shard = self._shards.pop(model, None)
            self._prepared.discard((place.path, place.schema))
        if shard is not None and shard.reader is not None:
            shard.reader.close()

    def live_bytes(self) -> int:
        """The bytes the cache's data takes (see ``Layout.live_bytes``): what a size budget
        counts."""
        places: list[Place] = [self.layout.text_place(), *self.layout.shard_places()]
        try:
            return sum(self.layout.live_bytes(p) for p in places if self.exists(p))
        except sa_exc.SQLAlchemyError as exc:
            raise self.error("cannot measure the cache", exc) from exc

    def total_bytes(self) -> int:
        """Bytes on disk of the whole cache: the texts and every shard."""
        places: list[Place] = [self.layout.text_place(), *self.layout.shard_places()]
        try:
            return sum(self.layout.bytes_on_disk(p) for p in places if self.exists(p))
        except sa_exc.SQLAlchemyError as exc:
            raise self.error("cannot measure the cache", exc) from exc

    def _forget(self, model: str, shard: _Shard) -> None:
        """Drop what this process knows of a shard, so that the next use opens it anew."""
        self.memory.forget(model)
        with self._lock:
            self._shards.pop(model, None)
            self._prepared.discard((shard.place.path, shard.place.schema))
        if shard.reader is not None:
            shard.reader.close()
        shard.place.engine.dispose()

    def error(self, action: str, exc: BaseException) -> StorageError:
        """A StorageError naming the cache, its password masked, and the driver's reason."""
        reason = str(exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc)
        if disk_full(exc, self.layout.out_of_room) and "full" not in reason:
            reason += " (disk full)"
        return StorageError(f"{action} at {self.layout.describe()}: {reason}")

    def close(self) -> None:
        """Write what waits and close every connection; a later use opens them anew (a
        restore replaces the files in between)."""
        self.flush()
        self.memory.clear()
        with self._lock:
            self._shards.clear()
            self._prepared.clear()
        self.layout.close()


def entries(
    store: Store, model: str
) -> Iterator[tuple[list[tuple[bytes, bytes]], dict[bytes, str]]]:
    """Every ``(hashid, vector)`` row of a model's shard in key order, ``tables.READ_CHUNK``
    at a time (`transfer`'s export), each chunk with the texts of its keys; read-only.

    Raises:
        StorageError: the shard or the texts could not be read.
    """
    place = store.layout.shard_place(model)
    table = shard_table(place)
    text_place = store.layout.text_place()
    texts = text_table(text_place)
    # Brings the text table to the current schema, or says it is not there (0 texts)
    # without creating it: reading all of a shard only reads.
    have_texts = store.text_count() > 0
    last = b""  # sorts before every 64-byte key
    try:
        with place.engine.connect() as vectors, text_place.engine.connect() as text_rows:
            while rows := table.after(vectors, last, tables.READ_CHUNK):
                last = rows[-1][0]
                found = texts.texts(text_rows, [k for k, _ in rows]) if have_texts else {}
                yield rows, found
    except sa_exc.SQLAlchemyError as exc:
        raise store.error(f"cannot read the shard of {model!r}", exc) from exc


def _checked_matrix(vectors: np.ndarray, n: int) -> np.ndarray:
    matrix = np.ascontiguousarray(vectors, dtype="<f4")
    if matrix.ndim != 2 or matrix.shape[0] != n or matrix.shape[1] == 0:
        raise DimensionMismatchError(
            f"expected {n} vectors as an (n, dim) array, got shape {np.shape(vectors)}"
        )
    bad = first_non_finite(matrix)
    if bad is not None:
        raise StorageError(f"refusing to store vector {bad}: it holds NaN or infinite values")
    return matrix


def _batches(
    keys: Sequence[bytes], replace: Sequence[bytes]
) -> Iterator[tuple[slice, list[bytes]]]:
    """The ``WRITE_BATCH`` slices of a `put`, each with the keys to replace among its own."""
    for start in range(0, len(keys), tables.WRITE_BATCH):
        part = slice(start, start + tables.WRITE_BATCH)
        own = set(keys[part])
        yield part, [k for k in replace if k in own]


def _vector_rows(
    keys: Sequence[bytes],
    matrix: np.ndarray,
    tokens: Sequence[int] | None,
    tokens_exact: bool,
    *,
    now: int,
) -> list[dict[str, Any]]:
    """The shard rows of a write: each vector new, and used, ``now``."""
    costs: Sequence[int | None] = [None] * len(keys) if tokens is None else tokens
    exact = None if tokens is None else tokens_exact
    return [
        {
            "hashid": k,
            "vector": row.tobytes(),
            "created_at": now,
            "last_used": now,
            "tokens": None if cost is None else int(cost),
            "tokens_exact": exact,
        }
        for k, row, cost in zip(keys, matrix, costs, strict=True)
    ]


def _assembled(
    rows: Sequence[HitRow], keys: Sequence[bytes], dimension: int, stale_before: int
) -> tuple[Lookup, list[bytes]]:
    """A lookup of ``keys`` from the rows found, and the keys whose last use is stale."""
    width = 4 * dimension
    where = dict(zip(keys, range(len(keys)), strict=True))
    # Each row goes to its key's slot, so that one join gives the vectors in key order:
    # with every key found, the matrix needs no reordering at all.
    slots: list[bytes | None] = [None] * len(keys)
    damaged: list[int] = []
    stale: list[bytes] = []
    tokens = 0
    for hashid, vector, last_used, cost in rows:
        if len(vector) == width:
            slots[where[hashid]] = vector
            if last_used < stale_before:
                stale.append(hashid)
            if cost is not None:
                tokens += cost
        else:
            damaged.append(where[hashid])
    if len(rows) == len(keys) and not damaged:
        positions = np.arange(len(keys), dtype=np.intp)
        data = bytearray().join(slots)  # type: ignore[arg-type]  # no None left
    else:
        positions = np.flatnonzero([slot is not None for slot in slots])
        data = bytearray().join(slot for slot in slots if slot is not None)
    # A bytearray makes the matrix writable: read-time options work on it in place.
    vectors = np.frombuffer(data, dtype="<f4").reshape(len(positions), dimension)
    return Lookup(positions, vectors, damaged, tokens), stale


def _read_only_ready(layout: Layout, place: Place, *, create: bool) -> bool:
    """`Store._ready` for a file this process cannot write: whether it is at the current
    schema, read as it is (never upgraded).

    Raises:
        ReadOnlyStorageError: ``create`` (nothing can be written there), or the file has an
            older schema.
    """
    if create:
        raise ReadOnlyStorageError(
            f"the cache at {layout.describe()} is read-only ({place.name} cannot be "
            "written): nothing was stored"
        )
    if not layout.may_exist(place):
        return False
    with place.engine.connect() as connection:
        current = migrate.state(connection, place, as_is=True)
    if current == "old":
        raise ReadOnlyStorageError(
            f"{place.name} in the read-only cache at {layout.describe()} has an older "
            "schema; open it once where it can be written to upgrade it"
        )
    return current == "head"


def _summary(
    place: str, row: Any, entries: int, size: int, totals: tuple[int, int, int]
) -> ShardSummary:
    """A shard's summary from its model row (``None`` once `prune` emptied it), its count of
    vectors, its bytes on disk and its token totals (counted, tokens, estimated)."""
    counted, tokens, estimated = totals
    return ShardSummary(
        place=place,
        model=row.model if row else None,
        dimension=row.dimension if row else None,
        entries=entries,
        bytes_on_disk=size,
        library_version=row.library_version if row else None,
        created_at=row.created_at if row else None,
        hits=row.hits if row else 0,
        misses=row.misses if row else 0,
        revision=row.revision if row else None,
        tokens_counted=counted,
        tokens=tokens,
        tokens_estimated=estimated,
        tokens_saved=row.tokens_saved if row else 0,
    )


def _vanished(exc: BaseException) -> bool:
    """Whether a SQLite shard file is gone (or was replaced by an empty one)."""
    message = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and (
        "unable to open database file" in message or "no such table" in message
    )


def _model_info(row: Any) -> ModelInfo:
    return ModelInfo(
        row.model,
        row.dimension,
        row.dtype,
        row.library_version,
        row.revision,
        bool(row.counts_tokens),
    )


def _ensure_info(
    connection: Connection,
    table: ShardTable,
    model: str,
    dimension: int,
    revision: str | None = None,
) -> ModelInfo:
    row = table.claim(
        connection,
        {
            "model": model,
            "dimension": dimension,
            "dtype": DTYPE,
            "library_version": __version__,
            "created_at": int(time.time()),
            "revision": revision,
        },
    )
    # Whoever claimed the shard, it is checked as if it had been there before.
    info = _model_info(row)
    _check_model(info, model, table.place)
    if revision is not None and info.revision != revision:
        held = table.claim_revision(connection, revision)
        if held != revision:
            raise ShardMismatchError(
                f"the shard {table.place.name} holds version {held} of model {model!r}, "
                f"not {revision}: the model changed while this call computed; call again"
            )
        info = dataclasses.replace(info, revision=revision)
    if info.dimension != dimension:
        raise DimensionMismatchError(
            f"model {model!r} gave {dimension}-d vectors, but its shard holds "
            f"{info.dimension}-d ones; a different model under the same name?"
        )
    return info


def _check_model(info: ModelInfo, model: str, place: ShardPlace) -> None:
    if info.model != model:
        raise ShardMismatchError(
            f"the shard {place.name} belongs to model {info.model!r}, not {model!r}: "
            "their slugs collide; use another name for one of them"
        )
