"""Batched reads and writes of texts and vectors, over the places a layout gives.

Reads are one ``IN (...)`` query per chunk of keys and one numpy reassembly. Writes are
insert-or-ignore in one transaction per batch, retried on transient errors. Nothing here
creates an ORM object, and a read never writes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Connection, bindparam, delete, func, insert, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.sql.dml import Insert

from .._version import __version__
from ..errors import DimensionMismatchError, ShardMismatchError, StorageError
from ..keys import model_slug
from .layout import Place, ShardPlace, SQLiteLayout
from .retry import retry_write
from .sqlite import is_not_a_database, move_aside, write_transaction

__all__ = ["READ_CHUNK", "Lookup", "ModelInfo", "ShardSummary", "Store"]

logger = logging.getLogger("embeddingcache.storage")

# Keys per SELECT ... IN (...): well under SQLite's 32,766 bound parameters and Postgres's
# 65,535, and large enough that the per-query cost vanishes next to the rows.
READ_CHUNK = 2000
DTYPE = "float32"


@dataclass(frozen=True)
class ModelInfo:
    """The sanity row of a model shard."""

    model: str
    dimension: int
    dtype: str
    library_version: str


@dataclass(frozen=True)
class Lookup:
    """What a read found: ``vectors[j]`` is the vector of ``keys[positions[j]]``.

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

    slug: str
    model: str | None
    dimension: int | None
    entries: int
    bytes_on_disk: int


@dataclass
class _Shard:
    place: ShardPlace
    info: ModelInfo | None


class Store:
    """Texts and one shard per model, in the places of a layout."""

    def __init__(self, layout: SQLiteLayout) -> None:
        self.layout = layout
        self._shards: dict[str, _Shard] = {}
        self._ready: set[object] = set()  # places whose tables this process has created
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
        table = shard.place.embedding
        query = select(table.c.hashid, table.c.vector).where(
            table.c.hashid.in_(bindparam("keys", expanding=True))
        )
        where = {key: i for i, key in enumerate(keys)}
        positions: list[int] = []
        blobs: list[bytes] = []
        damaged: list[int] = []
        try:
            with shard.place.engine.connect() as connection:
                for start in range(0, len(keys), READ_CHUNK):
                    chunk = keys[start : start + READ_CHUNK]
                    for hashid, vector in connection.execute(query, {"keys": chunk}):
                        if len(vector) == width:
                            positions.append(where[hashid])
                            blobs.append(vector)
                        else:
                            damaged.append(where[hashid])
        except sa_exc.SQLAlchemyError as exc:
            raise StorageError(f"cannot read the shard of {model!r}: {exc}") from exc
        vectors = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), dimension)
        return Lookup(np.asarray(positions, dtype=np.intp), vectors, damaged)

    def text_count(self) -> int:
        """Rows in the hashstring table (0 when it does not exist yet)."""
        path = self.layout.text_path()
        if not self.layout.exists(path):
            return 0
        place = self.layout.text_place()
        try:
            with place.engine.connect() as connection:
                count = connection.scalar(select(func.count()).select_from(place.hashstring))
                return int(count or 0)
        except sa_exc.OperationalError:
            return 0

    def summaries(self) -> list[ShardSummary]:
        """One summary per model shard present, read-only."""
        result = []
        for slug in self.layout.shard_slugs():
            place = self.layout.shard_place(slug)
            try:
                with place.engine.connect() as connection:
                    row = connection.execute(select(place.model_info)).first()
                    entries = connection.scalar(select(func.count()).select_from(place.embedding))
            except sa_exc.DBAPIError as exc:
                logger.warning("skipping shard %s: %s", slug, exc.orig)
                continue
            size = self.layout.bytes_on_disk(place.path) if place.path else 0
            result.append(
                ShardSummary(
                    slug=slug,
                    model=row.model if row else None,
                    dimension=row.dimension if row else None,
                    entries=int(entries or 0),
                    bytes_on_disk=size,
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
        self.layout.prepare()
        try:
            retry_write(lambda: self._put_texts(text_rows))
            retry_write(lambda: self._put_vectors(model, matrix.shape[1], vector_rows, replace))
        except sa_exc.SQLAlchemyError as exc:
            raise StorageError(
                f"cannot write to the cache at {self.layout.describe()}: {exc}"
            ) from exc

    def _put_texts(self, rows: list[dict[str, Any]]) -> None:
        place = self.layout.text_place()
        self._prepared(place)
        with write_transaction(place.engine) as connection:
            connection.execute(_insert_ignore(connection, place.hashstring), rows)

    def _put_vectors(
        self, model: str, dimension: int, rows: list[dict[str, Any]], replace: Sequence[bytes]
    ) -> None:
        place = self.layout.shard_place(model_slug(model))
        self._prepared(place)
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
            self._shards[model] = _Shard(place, info)

    # -- opening --------------------------------------------------------------------------

    def _open_shard(self, model: str) -> _Shard | None:
        shard = self._shards.get(model)
        if shard is not None and shard.info is not None:
            return shard
        place = self.layout.shard_place(model_slug(model)) if self._shard_exists(model) else None
        if place is None:
            return None
        info = self._read_info(model, place)
        shard = _Shard(place, info)
        with self._lock:
            self._shards[model] = shard
        return shard

    def _shard_exists(self, model: str) -> bool:
        return self.layout.exists(self.layout.shard_path(model_slug(model)))

    def _read_info(self, model: str, place: ShardPlace) -> ModelInfo | None:
        try:
            with place.engine.connect() as connection:
                row = connection.execute(select(place.model_info)).first()
        except sa_exc.OperationalError as exc:
            if "no such table" in str(exc.orig):
                return None  # created by a writer that has not committed its schema yet
            raise StorageError(f"cannot read the shard of {model!r}: {exc}") from exc
        except sa_exc.DatabaseError as exc:
            if not is_not_a_database(exc) or place.path is None:
                raise StorageError(f"cannot read the shard of {model!r}: {exc}") from exc
            place.engine.dispose()
            self._ready.discard(place.path)
            move_aside(place.path)
            return None
        if row is None:
            return None
        info = ModelInfo(row.model, row.dimension, row.dtype, row.library_version)
        _check_model(info, model, place)
        return info

    def _prepared(self, place: Place) -> Place:
        """Create the place's tables if missing, moving an unreadable file aside first."""
        token = place.path if place.path is not None else id(place.metadata)
        if token in self._ready:
            return place
        try:
            with write_transaction(place.engine) as connection:
                place.metadata.create_all(connection)
        except sa_exc.DatabaseError as exc:
            if not is_not_a_database(exc) or place.path is None:
                raise
            place.engine.dispose()
            move_aside(place.path)
            with write_transaction(place.engine) as connection:
                place.metadata.create_all(connection)
        self._ready.add(token)
        return place

    def close(self) -> None:
        with self._lock:
            self._shards.clear()
            self._ready.clear()
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
        info = ModelInfo(model, dimension, DTYPE, __version__)
        connection.execute(
            insert(place.model_info),
            {
                "id": 1,
                "model": info.model,
                "dimension": info.dimension,
                "dtype": info.dtype,
                "library_version": info.library_version,
                "created_at": int(time.time()),
            },
        )
        return info
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
        where = place.path if place.path is not None else "its shard"
        raise ShardMismatchError(
            f"the shard {where} belongs to model {info.model!r}, not {model!r}: "
            "their slugs collide; use another name for one of them"
        )
