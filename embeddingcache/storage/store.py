"""Batched reads and writes of texts and vectors, over the places a layout gives.

Reads are one ``IN (...)`` query per chunk of keys and one numpy reassembly. Writes are
insert-or-ignore in one transaction per batch, retried on transient errors. Nothing here
creates an ORM object, and a read never writes.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import Connection, bindparam, delete, func, insert, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.sql.dml import Insert

from .._version import __version__
from ..errors import DimensionMismatchError, ShardMismatchError, StorageError
from . import migrate
from .layout import Layout, Place, ShardPlace
from .retry import retry_write
from .sqlite import Reader, is_not_a_database, move_aside, write_transaction

__all__ = ["READ_CHUNK", "Lookup", "ModelInfo", "ShardSummary", "Store"]

logger = logging.getLogger("embeddingcache.storage")

# Keys per SELECT ... IN (...): well under SQLite's 32,766 bound parameters and Postgres's
# 65,535, and large enough that the per-query cost vanishes next to the rows.
READ_CHUNK = 2000
DTYPE = "float32"
_FIRST = np.zeros(1, dtype=np.intp)  # the positions of a lookup of one key that was found
_FIRST.flags.writeable = False


@dataclass(frozen=True)
class ModelInfo:
    """The sanity row of a model shard."""

    model: str
    dimension: int
    dtype: str
    library_version: str


class Lookup(NamedTuple):
    """What a read found: ``vectors[j]`` is the vector of ``keys[positions[j]]``, and
    ``positions`` ascends.

    ``damaged`` lists positions whose stored vector has the wrong length: to be recomputed.
    """

    positions: np.ndarray
    vectors: np.ndarray
    damaged: list[int]

    @classmethod
    def empty(cls, dimension: int = 0) -> Lookup:
        return cls(np.empty(0, dtype=np.intp), np.empty((0, dimension), dtype=np.float32), [])


@dataclass(frozen=True)
class ShardSummary:
    """What ``stats`` reports of one model shard."""

    place: str  # the file, or the schema, that holds the shard
    model: str | None
    dimension: int | None
    entries: int
    bytes_on_disk: int
    library_version: str | None = None  # of the embeddingcache that created the shard
    created_at: int | None = None  # Unix time


@dataclass
class _Shard:
    place: ShardPlace
    info: ModelInfo | None
    reader: Reader | None = None  # the SQLite hit path


class Store:
    """Texts and one shard per model, in the places of a layout."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._shards: dict[str, _Shard] = {}
        self._prepared: set[object] = set()  # places this process found at the current schema
        self._lock = threading.Lock()

    # -- reads ----------------------------------------------------------------------------

    def info(self, model: str) -> ModelInfo | None:
        """The shard's sanity row, or ``None`` when nothing is stored for the model yet."""
        shard = self._open_shard(model)
        return shard.info if shard is not None else None

    def lookup(self, model: str, keys: Sequence[bytes]) -> Lookup:
        """Find the stored vectors of distinct ``keys``; read-only."""
        shard = self._open_shard(model)
        if shard is None or shard.info is None or not keys:
            return Lookup.empty(shard.info.dimension if shard and shard.info else 0)
        dimension = shard.info.dimension
        width = 4 * dimension
        try:
            if shard.reader is not None:
                rows = shard.reader.rows(keys, READ_CHUNK)
            else:
                rows = self._rows(shard.place, keys)
        except (sa_exc.SQLAlchemyError, sqlite3.Error) as exc:
            if _vanished(exc):
                # Another process removed the file: nothing is stored; a write recreates it.
                self._forget(model, shard)
                return Lookup.empty(dimension)
            raise self._error(f"cannot read the shard of {model!r}", exc) from exc
        if len(rows) == len(keys) == 1 and len(rows[0][1]) == width:  # one cached text
            return Lookup(_FIRST, np.frombuffer(bytearray(rows[0][1]), "<f4")[None, :], [])
        where = dict(zip(keys, range(len(keys)), strict=True))
        # Each row goes to its key's slot, so that one join gives the vectors in key order:
        # with every key found, the matrix needs no reordering at all.
        slots: list[bytes | None] = [None] * len(keys)
        damaged: list[int] = []
        for hashid, vector in rows:
            if len(vector) == width:
                slots[where[hashid]] = vector
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
        return Lookup(positions, vectors, damaged)

    def _rows(self, place: ShardPlace, keys: Sequence[bytes]) -> list[Any]:
        table = place.embedding
        query = select(table.c.hashid, table.c.vector).where(
            table.c.hashid.in_(bindparam("keys", expanding=True))
        )
        rows: list[Any] = []
        with place.engine.connect() as connection:
            for start in range(0, len(keys), READ_CHUNK):
                rows += connection.execute(query, {"keys": keys[start : start + READ_CHUNK]})
        return rows

    def text_count(self) -> int:
        """Rows in the hashstring table (0 when it does not exist yet)."""
        place = self.layout.text_place()
        try:
            if not self._ready(place, create=False):
                return 0
            with place.engine.connect() as connection:
                count = connection.scalar(select(func.count()).select_from(place.hashstring))
        except sa_exc.SQLAlchemyError as exc:
            raise self._error("cannot read the texts", exc) from exc
        return int(count or 0)

    def migrate(self) -> list[str]:
        """Bring every place present to the current schema; the names of the places."""
        places: list[Place] = [self.layout.text_place(), *self.layout.shard_places()]
        done = []
        try:
            for place in places:
                if self._ready(place, create=False):
                    done.append(place.name)
        except sa_exc.SQLAlchemyError as exc:
            raise self._error("cannot migrate the cache", exc) from exc
        return done

    def summaries(self) -> list[ShardSummary]:
        """One summary per model shard present, read-only."""
        result = []
        for place in self.layout.shard_places():
            try:
                if not self._ready(place, create=False):
                    continue
                with place.engine.connect() as connection:
                    row = connection.execute(select(place.model_info)).first()
                    entries = connection.scalar(select(func.count()).select_from(place.embedding))
            except (sa_exc.DBAPIError, StorageError) as exc:
                logger.warning("skipping shard %s: %s", place.name, exc)
                continue
            result.append(
                ShardSummary(
                    place=place.name,
                    model=row.model if row else None,
                    dimension=row.dimension if row else None,
                    entries=int(entries or 0),
                    bytes_on_disk=self.layout.bytes_on_disk(place),
                    library_version=row.library_version if row else None,
                    created_at=row.created_at if row else None,
                )
            )
        return result

    # -- writes ---------------------------------------------------------------------------

    def put(
        self,
        model: str,
        keys: Sequence[bytes],
        texts: Sequence[str],
        vectors: np.ndarray,
        *,
        replace: Sequence[bytes] = (),
    ) -> None:
        """Store texts and their vectors; rows already present are kept as they are.

        Keys in ``replace`` are overwritten: their stored vectors were found damaged.
        Texts go in first: a crash between the two transactions leaves a text without a
        vector (a miss, recomputed), never a vector without its text.

        Raises:
            DimensionMismatchError: the vectors' dimension differs from the shard's.
            ShardMismatchError: the shard belongs to another model.
            StorageError: the database refused the write after the retries.
        """
        if not keys:
            return
        matrix = _checked_matrix(vectors, len(keys))
        now = int(time.time())
        text_rows = [{"hashid": k, "text": t} for k, t in zip(keys, texts, strict=True)]
        blobs = [row.tobytes() for row in matrix]
        vector_rows = [
            {"hashid": k, "vector": b, "created_at": now, "last_used": now}
            for k, b in zip(keys, blobs, strict=True)
        ]
        try:
            retry_write(lambda: self._put_texts(text_rows))
            retry_write(lambda: self._put_vectors(model, matrix.shape[1], vector_rows, replace))
        except sa_exc.SQLAlchemyError as exc:
            raise self._error("cannot write to the cache", exc) from exc

    def _put_texts(self, rows: list[dict[str, Any]]) -> None:
        place = self.layout.text_place()
        self._ready(place, create=True)
        with write_transaction(place.engine) as connection:
            if connection.dialect.name == "postgresql":
                rows = [_without_nul(row) for row in rows]
            connection.execute(_insert_ignore(connection, place.hashstring), rows)

    def _put_vectors(
        self, model: str, dimension: int, rows: list[dict[str, Any]], replace: Sequence[bytes]
    ) -> None:
        place = self.layout.shard_place(model)
        self._ready(place, create=True)
        with write_transaction(place.engine) as connection:
            info = _ensure_info(connection, place, model, dimension)
            if replace:
                table = place.embedding
                connection.execute(
                    delete(table).where(table.c.hashid.in_(bindparam("keys", expanding=True))),
                    {"keys": list(replace)},
                )
            connection.execute(_insert_ignore(connection, place.embedding), rows)
        with self._lock:
            self._shards[model] = _Shard(place, info, self.layout.reader(place))

    # -- opening --------------------------------------------------------------------------

    def _open_shard(self, model: str) -> _Shard | None:
        shard = self._shards.get(model)
        if shard is not None and shard.info is not None:
            return shard
        place = self.layout.shard_place(model)
        try:
            if not self._ready(place, create=False):
                return None
            with place.engine.connect() as connection:
                row = connection.execute(select(place.model_info)).first()
        except sa_exc.SQLAlchemyError as exc:
            raise self._error(f"cannot read the shard of {model!r}", exc) from exc
        if row is None:
            return None
        info = ModelInfo(row.model, row.dimension, row.dtype, row.library_version)
        _check_model(info, model, place)
        shard = _Shard(place, info, self.layout.reader(place))
        with self._lock:
            self._shards[model] = shard
        return shard

    def _ready(self, place: Place, *, create: bool) -> bool:
        """Whether the place exists at the current schema; creates or upgrades it as needed.

        A SQLite file that is not a database is moved aside first (and, for a read, reported
        as not there).
        """
        token = (place.path, place.schema)
        if token in self._prepared:
            return True
        if not self.layout.may_exist(place) and not create:
            return False
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

    def _forget(self, model: str, shard: _Shard) -> None:
        """Drop what this process knows of a shard, so that the next use opens it anew."""
        with self._lock:
            self._shards.pop(model, None)
            self._prepared.discard((shard.place.path, shard.place.schema))
        if shard.reader is not None:
            shard.reader.close()
        shard.place.engine.dispose()

    def _error(self, action: str, exc: BaseException) -> StorageError:
        """A StorageError naming the cache, its password masked, and the driver's reason."""
        reason = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
        return StorageError(f"{action} at {self.layout.describe()}: {reason}")

    def close(self) -> None:
        with self._lock:
            self._shards.clear()
            self._prepared.clear()
        self.layout.close()


def _checked_matrix(vectors: np.ndarray, n: int) -> np.ndarray:
    matrix = np.ascontiguousarray(vectors, dtype="<f4")
    if matrix.ndim != 2 or matrix.shape[0] != n or matrix.shape[1] == 0:
        raise DimensionMismatchError(
            f"expected {n} vectors as an (n, dim) array, got shape {np.shape(vectors)}"
        )
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise StorageError(f"refusing to store vector {bad}: it holds NaN or infinite values")
    return matrix


def _vanished(exc: BaseException) -> bool:
    """Whether a SQLite shard file is gone (or was replaced by an empty one)."""
    message = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and (
        "unable to open database file" in message or "no such table" in message
    )


def _without_nul(row: dict[str, Any]) -> dict[str, Any]:
    """Postgres text cannot hold NUL: the readable copy of the text gets U+FFFD instead.
    The key is the hash of the exact text, so the vector is still found by it."""
    text = row["text"]
    return {**row, "text": text.replace("\x00", "\ufffd")} if "\x00" in text else row


def _insert_ignore(connection: Connection, table: Any) -> Insert:
    """An INSERT that skips rows whose key is already stored, in the dialect's words."""
    dialect = connection.dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing()
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing()
    if dialect in ("mysql", "mariadb"):
        return insert(table).prefix_with("IGNORE")
    raise StorageError(f"unsupported database dialect {dialect!r}")


def _ensure_info(
    connection: Connection, place: ShardPlace, model: str, dimension: int
) -> ModelInfo:
    row = connection.execute(select(place.model_info)).first()
    if row is None:
        # Another writer may be claiming the shard at this moment: insert-or-ignore, then
        # read back whoever won, and check it as if it had been there before.
        connection.execute(
            _insert_ignore(connection, place.model_info),
            {
                "id": 1,
                "model": model,
                "dimension": dimension,
                "dtype": DTYPE,
                "library_version": __version__,
                "created_at": int(time.time()),
            },
        )
        row = connection.execute(select(place.model_info)).one()
    info = ModelInfo(row.model, row.dimension, row.dtype, row.library_version)
    _check_model(info, model, place)
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
